"""The user's lens model, written without autohdr's classes.

``TinyLens(image (B, 3, H, W))`` returns ``{"params": (B, 8), "residual_flow_lowres": (B, 2, H/4, W/4)}``
(autohdr's ``--model-factory`` contract): ``params`` are absolute Brown-Conrady values
``[k1, k2, k3, p1, p2, dcx, dcy, s]``, the identity plus a bounded step, and the flow is in pixels of
its own low resolution. Its parts are ``features`` (the backbone), ``lens`` (the parameter head) and
``refine`` (the residual head): names autohdr does not guess, so ``[tool.autohdr] groups`` names them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: The identity warp and the largest step away from it, per parameter.
IDENTITY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
REACH = (0.4, 0.1, 0.05, 0.01, 0.01, 0.04, 0.04, 0.1)


class TinyLens(nn.Module):
    """A four-layer CNN; ``detach_refine=True`` is a planted bug: the flow is cut from the graph."""

    def __init__(self, width: int = 16, detach_refine: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=2, padding=2), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.lens = nn.Linear(2 * width, 8)
        self.refine = nn.Conv2d(width, 2, 3, padding=1)
        self.detach_refine = detach_refine
        self.register_buffer("identity", torch.tensor(IDENTITY))
        self.register_buffer("reach", torch.tensor(REACH))
        # bounds the parameter head can reach, for autohdr's saturation figure
        self.param_bounds = tuple((i - r, i + r) for i, r in zip(IDENTITY, REACH))
        for layer in (self.lens, self.refine):  # start at the identity warp
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(image - 0.5)
        pooled = torch.cat([feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))], dim=1)
        params = self.identity + self.reach * torch.tanh(self.lens(pooled))
        flow = self.refine(feats.detach() if self.detach_refine else feats)
        if self.detach_refine:
            flow = flow.detach()
        return {"params": params, "residual_flow_lowres": flow}


def build() -> TinyLens:
    """The ``model_factory`` of ``[tool.autohdr]``."""
    return TinyLens()


def build_detached() -> TinyLens:
    """The same model with its residual flow detached (the residual head never learns)."""
    return TinyLens(detach_refine=True)
