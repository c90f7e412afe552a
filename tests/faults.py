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
    """Wraps a loader and, before every batch, sleeps ``factor`` times the compute of the step before.

    Like a loader starved by slow JPEG decoding, but defined relative to the run's own speed: the
    time the consumer spends between handing back one batch and asking for the next (its step's
    forward, backward and update) is measured, and the next batch is held back ``factor`` times
    that long. With ``factor = 3`` data loading is about 3/4 of every step on an idle machine and on
    a loaded one alike (a fixed sleep shrinks to a small share of a step that load slows down). The
    very first batch is not delayed (no step has been measured yet); the measurement carries over
    from one epoch to the next.
    """

    def __init__(self, loader: Iterable[Mapping], factor: float) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.loader = loader
        self.factor = factor
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)
        self.last_compute_s: float | None = None  # the consumer's time on the previous batch
        self.slept_s: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Mapping]:
        for batch in self.loader:
            if self.last_compute_s is not None:
                delay = self.factor * self.last_compute_s
                time.sleep(delay)
                self.slept_s.append(delay)
            handed_out = time.perf_counter()
            yield batch  # the consumer's step runs here, until it asks for the next batch
            self.last_compute_s = time.perf_counter() - handed_out


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


# ------------------------------------------------------------------ learning coverage

class _HeadInput(nn.Module):
    """Wraps a head and transforms every tensor it is fed (``transform(tensor) -> tensor``)."""

    def __init__(self, head: nn.Module, transform) -> None:
        super().__init__()
        self.head = head
        self._transform = transform

    def forward(self, *inputs):
        return self.head(*(self._transform(x) if isinstance(x, torch.Tensor) else x for x in inputs))


class DetachedFeatures(LensCorrectionModel):
    """The parameter head is fed detached backbone features: in stage 1 no gradient reaches the backbone."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.param_head = _HeadInput(self.param_head, torch.Tensor.detach)


class LateParameter(LensCorrectionModel):
    """Creates a gain parameter on its first forward, after the optimizer was built: it gets
    gradients but is never updated."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        if not hasattr(self, "late_gain"):
            self.late_gain = nn.Parameter(torch.ones((), device=image.device))
        identity = out["params"].new_tensor([0, 0, 0, 0, 0, 0, 0, 1.0])
        return {**out, "params": identity + (out["params"] - identity) * self.late_gain}


class UnusedParameters(LensCorrectionModel):
    """Holds a parameter-head layer that forward never uses: the optimizer updates it, nothing feeds it."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.param_head.spare = nn.Linear(8, 8)


# ------------------------------------------------------------------ evaluation path

class DropoutAtEval(LensCorrectionModel):
    """Dropout on the parameter head's input that stays on in eval mode (``training=True`` hard-coded)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.param_head = _HeadInput(self.param_head,
                                     lambda x: torch.nn.functional.dropout(x, 0.3, training=True))


class ResidualOffAtEval(LensCorrectionModel):
    """The residual branch is on in training and silently off in eval mode."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        if self.training:
            return out
        return {**out, "residual_flow_lowres": out["residual_flow_lowres"] * 0.0}


# ------------------------------------------------------------------ residual that moves but does not help

class TinyResidual(LensCorrectionModel):
    """The residual flow in the wrong units (x 0.01): non-zero, but a hundredth of what it should be."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        return {**out, "residual_flow_lowres": out["residual_flow_lowres"] * 0.01}


class HarmfulResidual(LensCorrectionModel):
    """A fixed, untrainable 4-px swirl added to the learned residual flow: it moves pixels the wrong way."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        flow = out["residual_flow_lowres"]
        _, _, h, w = flow.shape
        ys = torch.linspace(-1, 1, h, device=flow.device, dtype=flow.dtype).view(h, 1).expand(h, w)
        xs = torch.linspace(-1, 1, w, device=flow.device, dtype=flow.dtype).view(1, w).expand(h, w)
        swirl = torch.stack([torch.sin(3 * ys), torch.cos(3 * xs)]) * (4.0 / self.config.residual_stride)
        return {**out, "residual_flow_lowres": flow + swirl}


# ------------------------------------------------------------------ data faults (loader wrappers)

class _LoaderFault:
    """Wraps a loader; ``applies_to_val``: the same bug also reaches the validation loader."""

    applies_to_val = False

    def __init__(self, loader: Iterable[Mapping]) -> None:
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)


class RepeatFirstBatch(_LoaderFault):
    """Yields the first batch again and again (a cached batch served for every step)."""

    def __iter__(self) -> Iterator[Mapping]:
        first = next(iter(self.loader))
        for _ in range(len(self.loader)):
            yield first


class Scaled255(_LoaderFault):
    """Images in 0..255 instead of 0..1 (a forgotten division)."""

    def __iter__(self) -> Iterator[Mapping]:
        for batch in self.loader:
            yield {**batch, "input_image": batch["input_image"] * 255.0, "target_image": batch["target_image"] * 255.0}


class NaNInOneBatch(_LoaderFault):
    """One NaN pixel in the second sample of the second batch (a corrupt decode)."""

    def __iter__(self) -> Iterator[Mapping]:
        for index, batch in enumerate(self.loader):
            if index == 1:
                image = batch["input_image"].clone()
                image[min(1, image.shape[0] - 1), 0, 0, 0] = float("nan")
                batch = {**batch, "input_image": image}
            yield batch


class SwappedPairs(_LoaderFault):
    """Inputs and targets swapped, in training and validation alike (a column mix-up in a split CSV)."""

    applies_to_val = True

    def __iter__(self) -> Iterator[Mapping]:
        for batch in self.loader:
            yield {**batch, "input_image": batch["target_image"], "target_image": batch["input_image"]}

