"""Lens models written the way users write them, not with autohdr's classes.

:class:`ForeignLensNet` has no submodule called ``backbone``, ``param_head`` or
``residual_head``: its network lives under ``self.net`` (``encoder``, ``head``, ``flow``), its
parameters are ``offset + span * tanh(raw)``, and it uses GroupNorm and GELU; its forward follows
autohdr's documented contract only (``{"params": (B, 8), "residual_flow_lowres": (B, 2, h, w)}``).

:class:`AtanhLensNet` has its own module names (``encoder``, ``head``, ``flow``), its own config
dataclass (with a key autohdr's ``ModelConfig`` does not know, ``backbone_name``), and a
Brown-Conrady head that maps raw outputs to ``centre + half_range * tanh(raw)`` and starts at the
identity by setting its bias to ``atanh((identity - centre) / half_range)``. In float32 that gives
the scale ``0.99999994`` (``1 - 2**-24``) for the bounds ``(0.9, 1.2)``, not exactly 1: the case
``init_is_identity`` must call identity. Factories for ``--model-factory tests.user_models:NAME``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

#: Bounds of ``[k1, k2, k3, p1, p2, dcx, dcy, s]``; the scale's are not centred on 1.
USER_BOUNDS: tuple[tuple[float, float], ...] = (
    (-0.5, 0.5), (-0.2, 0.2), (-0.1, 0.1), (-0.02, 0.02), (-0.02, 0.02), (-0.05, 0.05), (-0.05, 0.05), (0.9, 1.2))
_IDENTITY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class UserLensConfig:
    backbone_name: str = "tiny-cnn"   # not a ModelConfig key: its checkpoints are not LensCorrectionModel's
    width: int = 8                    # channels of the two encoder convolutions
    scale_offset: float = 0.0         # added to the initial scale (0: identity to float32 precision)


class AtanhLensNet(nn.Module):
    """``forward(image (B, 3, H, W))`` -> ``params (B, 8)`` and ``residual_flow_lowres (B, 2, H/4, W/4)``."""

    def __init__(self, config: UserLensConfig | None = None) -> None:
        super().__init__()
        self.config = config or UserLensConfig()
        width = self.config.width
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(width, 8)
        self.flow = nn.Conv2d(width, 2, 3, padding=1)
        lo, hi = (torch.tensor(b, dtype=torch.float64) for b in zip(*USER_BOUNDS))
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        start = torch.tensor(_IDENTITY, dtype=torch.float64)
        start[7] += self.config.scale_offset
        self.register_buffer("centre", centre.float())
        self.register_buffer("half_range", half.float())
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([math.atanh(v) for v in ((start - centre) / half).tolist()]))
            self.flow.weight.zero_()
            self.flow.bias.zero_()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(image * 2.0 - 1.0)
        raw = self.head(features.mean(dim=(2, 3)))
        return {"params": self.centre + self.half_range * torch.tanh(raw),
                "residual_flow_lowres": self.flow(features)}


def atanh_lens_model() -> AtanhLensNet:
    """The user's model at its identity init (scale ``1 - 2**-24`` in float32); declares no ``param_bounds``."""
    return AtanhLensNet()


def atanh_lens_model_with_bounds() -> AtanhLensNet:
    """:func:`atanh_lens_model` declaring its :data:`USER_BOUNDS` as ``param_bounds``."""
    model = AtanhLensNet()
    model.param_bounds = USER_BOUNDS
    return model


def wider_atanh_lens_model() -> AtanhLensNet:
    """The same architecture with 16 channels: a checkpoint of :func:`atanh_lens_model` does not fit it."""
    return AtanhLensNet(UserLensConfig(width=16))


# ---------------------------------------------------------------- ForeignLensNet

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
