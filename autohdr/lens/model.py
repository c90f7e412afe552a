"""The lens-correction network: a ResNet-style backbone, a bounded parameter head, a residual flow head.

The model predicts a warp, never pixels. ``forward(image)`` returns a dict:

* ``params``: ``(B, 8)`` bounded Brown-Conrady parameters ``[k1, k2, k3, p1, p2, dcx, dcy, s]``;
* ``params_raw``: ``(B, 8)`` the unbounded head output the bounds are applied to;
* ``residual_flow_lowres``: ``(B, 2, H/stride, W/stride)`` flow in pixels of that low resolution,
  bounded by ``residual_max_px``.

Warping and fusion live in :mod:`autohdr.lens.geometry` (``apply_correction``), so any module that
returns ``params`` (and optionally ``residual_flow_lowres``) can be trained the same way.

At initialization both heads output exactly the identity warp (zero-initialized last layers),
and both last layers still receive non-zero gradients on the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from autohdr.lens.geometry import IDENTITY_PARAMS, PARAM_NAMES, check_image

#: Default per-parameter bounds, in the canonical order ``[k1, k2, k3, p1, p2, dcx, dcy, s]``.
#: In normalized coordinates the corners sit at ``r^2 = 2``, where ``k2`` and ``k3`` act 2x and 4x
#: as strongly as ``k1`` and along nearly the same curve: wide bounds on them let the loss trade
#: ``k1`` against ``k2``/``k3``. ``|k2| <= 0.1`` and ``|k3| <= 0.03`` still move a corner by up to 0.4
#: and 0.24 of the half-side. Measured on the 32 overfit fixtures (160 steps, 128x128): predicted k1
#: correlates 0.31-0.35 with ground truth with the former bounds (k2 0.3, k3 0.15, p 0.03, dc 0.08,
#: s 0.9-1.2), 0.62 with these k2/k3 bounds, 0.63-0.68 with the rest tightened too.
DEFAULT_PARAM_BOUNDS: tuple[tuple[float, float], ...] = (
    (-0.6, 0.6),      # k1
    (-0.1, 0.1),      # k2
    (-0.03, 0.03),    # k3
    (-0.015, 0.015),  # p1
    (-0.015, 0.015),  # p2
    (-0.05, 0.05),    # dcx
    (-0.05, 0.05),    # dcy
    (0.9, 1.1),       # s
)


def check_param_bounds(bounds, where: str = "param_bounds") -> tuple[tuple[float, float], ...]:
    """``bounds`` as 8 float ``(lo, hi)`` pairs in the order ``[k1, k2, k3, p1, p2, dcx, dcy, s]``.

    Raises:
        ValueError: naming ``where``, unless there are 8 pairs of finite numbers with
            ``lo < identity < hi`` for each parameter (identity: 0, and 1 for ``s``).
    """
    try:
        pairs = tuple((float(lo), float(hi)) for lo, hi in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {len(PARAM_NAMES)} (lo, hi) pairs of numbers in the order "
                         f"{list(PARAM_NAMES)}, got {bounds!r}") from None
    if len(pairs) != len(PARAM_NAMES):
        raise ValueError(f"{where} needs {len(PARAM_NAMES)} (lo, hi) pairs (one per {list(PARAM_NAMES)}), "
                         f"got {len(pairs)}")
    for name, (lo, hi), ident in zip(PARAM_NAMES, pairs, IDENTITY_PARAMS):
        if not lo < ident < hi:  # also refuses nan
            raise ValueError(f"{where}: bounds of {name} must contain its identity value {ident} strictly, "
                             f"got ({lo}, {hi})")
    return pairs


def resolve_param_bounds(model: nn.Module) -> tuple[tuple[tuple[float, float], ...], str | None]:
    """The parameter bounds to judge ``params_at_bound_frac`` against, and a notice when they are defaults.

    A model declares its bounds with the attribute ``param_bounds``: 8 ``(lo, hi)`` pairs in the
    order ``[k1, k2, k3, p1, p2, dcx, dcy, s]`` (:class:`LensCorrectionModel` sets it from its
    config). A model that declares none is judged against :data:`DEFAULT_PARAM_BOUNDS`, and the
    notice (one line) says so and how to declare its own.

    Raises:
        ValueError: the declared ``param_bounds`` are malformed (see :func:`check_param_bounds`).
    """
    declared = getattr(model, "param_bounds", None)
    if declared is not None:
        return check_param_bounds(declared, f"{type(model).__name__}.param_bounds"), None
    return DEFAULT_PARAM_BOUNDS, (f"{type(model).__name__} declares no param_bounds: judging parameter saturation "
                                  f"against autohdr's defaults {[list(b) for b in DEFAULT_PARAM_BOUNDS]}; set "
                                  f"model.param_bounds to its 8 (lo, hi) pairs in {list(PARAM_NAMES)} order")


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of :class:`LensCorrectionModel`; stored inside every checkpoint."""

    widths: tuple[int, ...] = (16, 32, 64, 96)  # channels of each backbone stage (stride 2 each)
    blocks_per_stage: int = 1                   # residual blocks per stage
    coord_channels: bool = False                # append normalized (x, y) channels to the input
    groups: int = 8                             # GroupNorm groups (no batch statistics: DDP-safe)
    head_pool: int = 8                          # parameter head sees the last stage pooled to pool x pool cells
    head_hidden: int = 64                       # hidden width of the parameter head's MLP
    residual_hidden: int = 32                   # hidden channels of the residual head
    residual_stride: int = 8                    # low-res flow is (H / stride, W / stride); power of 2
    residual_max_px: float = 4.0                # bound on the flow, in low-resolution pixels
    residual_gain: float = 0.1                  # flow per unit of the last conv's output near zero
    param_bounds: tuple[tuple[float, float], ...] = field(default=DEFAULT_PARAM_BOUNDS)

    def __post_init__(self) -> None:
        if len(self.param_bounds) != len(PARAM_NAMES):
            raise ValueError(f"param_bounds needs {len(PARAM_NAMES)} (lo, hi) pairs, got {len(self.param_bounds)}")
        for name, (lo, hi), ident in zip(PARAM_NAMES, self.param_bounds, IDENTITY_PARAMS):
            if not lo < ident < hi:
                raise ValueError(f"bounds of {name} must contain the identity value {ident} strictly, got ({lo}, {hi})")
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if self.head_pool < 1:
            raise ValueError(f"head_pool must be >= 1 (1: global average pooling), got {self.head_pool}")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"every width must be divisible by groups={self.groups}, got {self.widths}")
        stride = self.residual_stride
        if stride < 2 or stride & (stride - 1) or stride > 2 ** len(self.widths):
            raise ValueError(f"residual_stride must be a power of 2 in [2, {2 ** len(self.widths)}], got {stride}")
        if self.residual_max_px <= 0:
            raise ValueError(f"residual_max_px must be positive, got {self.residual_max_px}")
        if self.residual_gain <= 0:
            raise ValueError(f"residual_gain must be positive, got {self.residual_gain}")


def bound_params(raw: torch.Tensor, bounds: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """Map unbounded ``raw`` ``(B, 8)`` into ``bounds``, with ``raw = 0`` giving the identity.

    ``param = identity + tanh(raw) * (hi - identity)`` for ``raw >= 0`` and
    ``identity + tanh(raw) * (identity - lo)`` below, so each side reaches its own bound.
    """
    lo = raw.new_tensor([b[0] for b in bounds])
    hi = raw.new_tensor([b[1] for b in bounds])
    ident = raw.new_tensor(IDENTITY_PARAMS)
    t = torch.tanh(raw)
    return ident + torch.where(t >= 0, t * (hi - ident), t * (ident - lo))


def coordinate_channels(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Normalized ``(x, y)`` coordinates as image channels, ``(batch, 2, height, width)``."""
    ys = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy)).unsqueeze(0).expand(batch, -1, -1, -1)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, plus a (strided 1x1) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.skip = (nn.Identity() if stride == 1 and in_ch == out_ch
                     else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.silu(out + self.skip(x))


class Backbone(nn.Module):
    """Compact ResNet-style CNN; stage ``i`` runs at stride ``2 ** (i + 1)``.

    ``forward(image (B, 3, H, W)) -> list`` of stage features ``(B, widths[i], H / 2^(i+1), W / 2^(i+1))``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.coord_channels = config.coord_channels
        in_ch = 3 + (2 if config.coord_channels else 0)
        stages = []
        for width in config.widths:
            blocks = [ResidualBlock(in_ch, width, stride=2, groups=config.groups)]
            blocks += [ResidualBlock(width, width, 1, config.groups) for _ in range(config.blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = image * 2.0 - 1.0
        if self.coord_channels:
            b, _, h, w = image.shape
            x = torch.cat((x, coordinate_channels(b, h, w, image)), dim=1)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class EqualizedLinear(nn.Module):
    """``y = x @ (weight / sqrt(in_features)).T + bias`` with ``weight`` drawn from ``U(-1, 1)``.

    The same initial function as ``nn.Linear``, but Adam's steps, which are about ``lr`` per weight
    whatever the gradient's size, move each output by ``O(lr)`` instead of ``O(lr * in_features)``.
    With the head's 6144 inputs a plain ``nn.Linear`` swung its hidden units by ~15 per step at
    ``lr = 3e-3``: it trained only while gradient clipping held it back (clipped on 54 % of the
    overfit steps at norm 5; at norm 20 the head saturated at its bounds and stayed there).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = in_features ** -0.5
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1.0, 1.0))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class ParamHead(nn.Module):
    """Spatial pooling, LayerNorm and an MLP to 8 raw values; the last layer starts at zero (identity warp).

    The last stage is average-pooled to a ``pool x pool`` grid of cells and flattened, so the head
    sees *where* each feature is: lens distortion grows with the distance from the centre, and
    images differ in where their content lies. A global average (``pool = 1``) keeps neither;
    measured on the 32 overfit fixtures at 128x128, the pooled features of different images then
    have a mean cosine similarity of 0.96 (0.31 for the 8 x 8 grid without coordinate channels),
    so every image gets nearly the same lens. The LayerNorm (per sample, no batch statistics)
    removes the offset all images share before the MLP, whose first layer is an
    :class:`EqualizedLinear` (its many inputs would make Adam's steps too large otherwise).
    """

    def __init__(self, in_ch: int, hidden: int, bounds: tuple[tuple[float, float], ...], pool: int = 8) -> None:
        super().__init__()
        self.bounds = bounds
        self.pool = pool
        cells = in_ch * pool * pool
        self.norm = nn.LayerNorm(cells)
        self.fc1 = EqualizedLinear(cells, hidden)
        self.fc2 = nn.Linear(hidden, len(PARAM_NAMES))
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features (B, C, h, w) -> (params (B, 8), params_raw (B, 8))``."""
        cells = F.adaptive_avg_pool2d(features, self.pool).flatten(1)  # (B, C * pool * pool)
        raw = self.fc2(F.silu(self.fc1(self.norm(cells))))
        return bound_params(raw, self.bounds), raw


class ResidualHead(nn.Module):
    """Low-resolution flow ``max_px * tanh(gain * conv / max_px)``; the last conv starts at zero.

    A zero last layer gives a zero flow at init, yet its weights get a non-zero gradient
    (``dL/dflow * gain * features``) from the first stage-2 step. The small ``gain`` keeps both
    that gradient and the flow change of one optimizer step small, so a fresh residual branch does
    not jump to its bound on its first steps (and does not dominate gradient clipping).
    """

    def __init__(self, in_ch: int, hidden: int, groups: int, max_px: float, gain: float = 0.1) -> None:
        super().__init__()
        self.max_px = max_px
        self.gain = gain
        self.conv1 = nn.Conv2d(in_ch, hidden, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(groups, hidden), hidden)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features (B, C, h, w) -> flow (B, 2, h, w)`` in pixels of ``(h, w)``."""
        raw = self.conv2(F.silu(self.norm1(self.conv1(features))))
        return self.max_px * torch.tanh(raw * (self.gain / self.max_px))


class LensCorrectionModel(nn.Module):
    """Backbone + parameter head + residual head. ``LensCorrectionModel()`` uses the defaults.

    ``forward(image (B, 3, H, W))`` needs ``H`` and ``W`` divisible by ``2 ** len(widths)``.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        cfg = self.config
        self.param_bounds = cfg.param_bounds
        self.backbone = Backbone(cfg)
        self.param_head = ParamHead(cfg.widths[-1], cfg.head_hidden, cfg.param_bounds, cfg.head_pool)
        self._residual_level = cfg.residual_stride.bit_length() - 2  # stride 2 -> stage 0
        self.residual_head = ResidualHead(cfg.widths[self._residual_level], cfg.residual_hidden,
                                          cfg.groups, cfg.residual_max_px, cfg.residual_gain)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        check_image(image)
        factor = 2 ** len(self.config.widths)
        if image.shape[-2] % factor or image.shape[-1] % factor:
            raise ValueError(
                f"image height and width must be divisible by {factor}, got {tuple(image.shape[-2:])}"
            )
        features = self.backbone(image)
        params, params_raw = self.param_head(features[-1])
        flow = self.residual_head(features[self._residual_level])
        return {"params": params, "params_raw": params_raw, "residual_flow_lowres": flow}
