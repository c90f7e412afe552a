"""Lens models written the way a user would, not the way autohdr's own model is.

:class:`ForeignLensNet` has no submodule called ``backbone``, ``param_head`` or
``residual_head``: its network lives under ``self.net`` (``encoder``, ``head``, ``flow``), its
parameters are ``offset + span * tanh(raw)``, and it uses GroupNorm and GELU. Its forward follows
autohdr's documented contract only: ``{"params": (B, 8), "residual_flow_lowres": (B, 2, h, w)}``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: ``--groups`` for :class:`ForeignLensNet`.
FOREIGN_GROUPS = {"backbone": "net.encoder", "param_head": "net.head", "residual_head": "net.flow"}
FOREIGN_GROUPS_TEXT = "backbone=net.encoder,param_head=net.head,residual_head=net.flow"

#: [k1, k2, k3, p1, p2, dcx, dcy, s] = offset + span * tanh(raw); raw = 0 is the identity warp.
_OFFSET = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
_SPAN = (0.5, 0.2, 0.1, 0.02, 0.02, 0.05, 0.05, 0.15)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.GELU())


class _Net(nn.Module):
    def __init__(self, width: int = 24, flow_gain: float = 1.0) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_block(3, width), _block(width, width), _block(width, width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 32), nn.GELU(),
                                  nn.Linear(32, 8))
        self.flow = nn.Conv2d(width, 2, 3, padding=1)
        self.flow_gain = flow_gain
        for layer in (self.head[-1], self.flow):  # identity at init: zero raw parameters, zero flow
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


class ForeignLensNet(nn.Module):
    """``image (B, 3, H, W)`` -> ``params (B, 8)`` and a stride-8 ``residual_flow_lowres (B, 2, H/8, W/8)``."""

    def __init__(self, width: int = 24, flow_gain: float = 1.0) -> None:
        super().__init__()
        self.net = _Net(width, flow_gain)
        self.register_buffer("offset", torch.tensor(_OFFSET))
        self.register_buffer("span", torch.tensor(_SPAN))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.encoder(image)
        params = self.offset + self.span * torch.tanh(self.net.head(features))
        return {"params": params, "residual_flow_lowres": self.net.flow_gain * self.net.flow(features)}


def build_foreign() -> ForeignLensNet:
    """A ``--model-factory`` for :class:`ForeignLensNet`."""
    return ForeignLensNet()
