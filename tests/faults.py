"""Deliberately broken pipelines, built only with the public API, for the red diagnostic tests.

Each fault is a model factory or a loader wrapper that ``run_debug_mode`` accepts as it would a
user's own model or loader. A model fault keeps the submodule names ``backbone``, ``param_head``
and ``residual_head`` so the instrumentation sees it exactly as it sees the healthy model.
"""

from __future__ import annotations

import copy
import time
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from autohdr.lens.model import LensCorrectionModel, ModelConfig


class FrozenResidualHead(LensCorrectionModel):
    """The residual head's parameters have ``requires_grad`` off: stage 2 cannot train it."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.residual_head.requires_grad_(False)


class _ParameterFreeFlow(nn.Module):
    """A residual "head" with no parameters at all: a zero flow ``(B, 2, h, w)``."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        return features.new_zeros(b, 2, h, w)


class ResidualHeadWithoutParameters(LensCorrectionModel):
    """The residual head was replaced by a module with no trainable parameters."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.residual_head = _ParameterFreeFlow(self.config.residual_stride)


class DetachedResidual(LensCorrectionModel):
    """The residual flow is detached before fusion: it is used, but no gradient reaches its head."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        return {**out, "residual_flow_lowres": out["residual_flow_lowres"].detach()}


class ZeroedResidual(LensCorrectionModel):
    """The residual flow is multiplied by zero before fusion."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        return {**out, "residual_flow_lowres": out["residual_flow_lowres"] * 0.0}


class DetachedParamHead(LensCorrectionModel):
    """The predicted lens parameters are detached from the warp."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        return {**out, "params": out["params"].detach()}


class StaleEvaluation(LensCorrectionModel):
    """In eval mode it answers with a snapshot of its initial weights: validation sees a stale model.

    The snapshot is kept outside the module tree (not a submodule), as a cached copy of a model
    would be, so training never touches it.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        object.__setattr__(self, "_snapshot", copy.deepcopy(self).eval())

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            return super().forward(image)
        with torch.no_grad():
            return LensCorrectionModel.forward(self._snapshot, image)


#: A fixed non-identity lens, far from the fixture data's own: correcting with it hurts.
STUCK_PARAMS = (-0.25, 0.05, 0.0, 0.01, -0.01, 0.03, -0.03, 1.05)


class StuckNonIdentity(LensCorrectionModel):
    """Always predicts :data:`STUCK_PARAMS`, whatever it is trained on (it cannot learn)."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        stuck = torch.tensor(STUCK_PARAMS, device=image.device, dtype=out["params"].dtype)
        return {**out, "params": stuck.expand_as(out["params"]) + 0.0 * out["params"]}


class RandomlyInitializedParamHead(LensCorrectionModel):
    """The parameter head's last layer is randomly initialized: the untrained model is not identity."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.param_head.fc2.weight.normal_(0.0, 0.5, generator=generator)
            self.param_head.fc2.bias.normal_(0.0, 0.5, generator=generator)


class SaturatedParamHead(LensCorrectionModel):
    """Raw parameters pushed far past the bounds: every bounded parameter sits at a bound."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        raw = out["params_raw"] + 50.0
        return {**out, "params_raw": raw, "params": self.bound(raw)}

    def bound(self, raw: torch.Tensor) -> torch.Tensor:
        from autohdr.lens.model import bound_params
        return bound_params(raw, self.param_bounds)


# ---------------------------------------------------------------- models that ignore their input
# Each still beats identity on the overfit subset (one good lens for the whole data set beats no
# correction) and trains normally; only beats_constant_lens can tell it from a model that learns
# each image's lens.

class _BatchMeanFeatures(nn.Module):
    """Feeds the wrapped parameter head the batch's mean features, ``(B, C, h, w)`` all equal."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(features.mean(dim=0, keepdim=True).expand_as(features))


class BatchAveragedFeatures(LensCorrectionModel):
    """The parameter head sees the features averaged over the batch: one lens per batch, whatever
    each image shows (a reduction over the wrong dimension)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.param_head = _BatchMeanFeatures(self.param_head)


class _ConstantFeatures(nn.Module):
    """Feeds the wrapped parameter head constant features (ones of the features' shape)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(torch.ones_like(features))


class ConstantFeaturesParamHead(LensCorrectionModel):
    """The parameter head is fed constant features instead of the backbone's (a wrong tensor passed
    on): it trains, but can only learn one lens."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.param_head = _ConstantFeatures(self.param_head)


class _BiasOnlyHead(nn.Module):
    """Eight trainable raw values used for every image: ``raw = gain * bias``, ``(B, 8)``.

    The gain lets Adam's ~lr-sized steps move the lens about as fast as the real head's many
    weights move its output, so the fault learns its one lens within a short run.
    """

    def __init__(self, bounds: tuple[tuple[float, float], ...], gain: float = 20.0) -> None:
        super().__init__()
        self.bounds = bounds
        self.gain = gain
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from autohdr.lens.model import bound_params
        raw = (self.gain * self.bias).expand(features.shape[0], -1)
        return bound_params(raw, self.bounds), raw


class FrozenBackboneBiasHead(LensCorrectionModel):
    """The backbone is frozen at its random initialization and the parameter head is only a bias."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.backbone.requires_grad_(False)
        self.param_head = _BiasOnlyHead(self.param_bounds)


class SleepingLoader:
    """Wraps a loader and sleeps before every batch, like a loader starved by slow JPEG decoding."""

    def __init__(self, loader: Iterable[Mapping], seconds: float) -> None:
        self.loader = loader
        self.seconds = seconds
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Mapping]:
        for batch in self.loader:
            time.sleep(self.seconds)
            yield batch


class _BatchNormParamHead(nn.Module):
    """The parameter head with a ``BatchNorm1d`` (instead of its LayerNorm) on the pooled cells
    (zero last layer kept)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.bounds = head.bounds
        self.pool = head.pool
        self.norm = nn.BatchNorm1d(head.fc1.in_features, momentum=0.5)
        self.fc1, self.fc2 = head.fc1, head.fc2

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from autohdr.lens.model import bound_params
        cells = torch.nn.functional.adaptive_avg_pool2d(features, self.pool).flatten(1)
        raw = self.fc2(torch.nn.functional.silu(self.fc1(self.norm(cells))))
        return bound_params(raw, self.bounds), raw


class BatchNormParamHead(LensCorrectionModel):
    """Batch-norm statistics in the parameter head. Under DDP with ``ddp_broadcast_buffers=false``
    each rank keeps the running statistics of its own shard, so the ranks' models drift apart."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.param_head = _BatchNormParamHead(self.param_head)
