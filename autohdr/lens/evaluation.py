"""Forward warp and evaluation shared by the trainer, the debug modes and the helper scripts.

``correct(model, image, residual_active)`` is the one place where a model's outputs become a
prediction: parametric grid, optional residual fusion, one ``grid_sample``. Training, validation,
the probe and ``debug_compare_identity`` all call it, so they cannot drift apart.

Two predictions come out of one warp grid:

* ``Correction.prediction`` -- zeros outside the input frame, as the challenge scores it (the
  proxy, the probe, the plots);
* ``Correction.loss_prediction`` -- out-of-frame samples take the nearest border pixel. The
  training loss compares this one. A correct lens samples outside the input near the corners (the
  fixtures' corrections leave 20-46 % of the frame there), where the target has content the input
  never had: with zeros there, black corners dominate the photometric loss and its minimum moves
  away from the true lens (measured on the 32 overfit fixtures, free per-image parameters fitted by
  the loss: k1 correlation with ground truth 0.40 and a 9 px mean grid error with zeros, 0.91 and
  0.5 px with border samples). Border sampling also gives out-of-frame pixels no gradient across the
  frame, so they neither pull the lens in nor push it out.

:func:`score_subset` scores a model against the identity warp, the ground truth where known, and
the *constant lens* (the model's own mean parameters applied to every image): a model that
ignores its input can beat identity, never its own mean lens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from autohdr.data.dataset import check_batch_range
from autohdr.lens.geometry import ALIGN_CORNERS, PARAM_NAMES, WarpResult, apply_correction, identity_params
from autohdr.lens.proxy import proxy_score_batch

PROXY_KEYS: tuple[str, ...] = ("total", "edge", "line", "grad", "ssim", "mae", "hard_fail")


@dataclass(frozen=True)
class Correction:
    """Model outputs with the warp they produce. ``params (B, 8)``; flow ``(B, 2, h, w)`` or None;
    ``image`` the ``(B, 3, H, W)`` input the warp was applied to."""

    params: torch.Tensor
    residual_flow_lowres: torch.Tensor | None
    warp: WarpResult
    image: torch.Tensor

    @property
    def prediction(self) -> torch.Tensor:
        """``(B, 3, H, W)``, zeros outside the input frame: what the proxy and the challenge score."""
        return self.warp.prediction

    @cached_property
    def loss_prediction(self) -> torch.Tensor:
        """``(B, 3, H, W)`` from the same grid, out-of-frame samples taken from the nearest border
        pixel: what the training loss compares (see the module docstring)."""
        grid = self.warp.final_grid.to(self.image.dtype)
        # grid_sample's border mode crashes (segfault in backward) on NaN coordinates, which a
        # diverging model produces: sample at finite stand-ins, and make the whole prediction NaN
        # when any coordinate is not finite, so the loss is non-finite and the run stops with a
        # clear error (no host sync here).
        is_finite = torch.isfinite(grid)
        sampled = F.grid_sample(self.image, torch.where(is_finite, grid, torch.zeros_like(grid)), mode="bilinear",
                                padding_mode="border", align_corners=ALIGN_CORNERS)
        return sampled + torch.where(is_finite.all(), 0.0, float("nan")).to(sampled.dtype)


def model_outputs(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` and check it returns a mapping with ``params`` ``(B, 8)``."""
    outputs = model(image)
    if not isinstance(outputs, Mapping) or "params" not in outputs:
        if isinstance(outputs, Mapping):
            keys = ", ".join(repr(k) for k in list(outputs)[:8]) or "no keys"
            got = f"a {type(outputs).__name__} with {keys} but no 'params'"
        elif isinstance(outputs, torch.Tensor):
            got = f"a tensor of shape {tuple(outputs.shape)} (wrap it: {{'params': ...}})"
        else:
            got = type(outputs).__name__
        raise ValueError(f"the model's forward ({type(model).__name__}) must return a dict with 'params' (B, 8) "
                         f"and optionally 'residual_flow_lowres'; got {got}")
    return outputs


def correct(model: nn.Module, image: torch.Tensor, residual_active: bool) -> Correction:
    """Predict the warp for ``image`` ``(B, 3, H, W)`` and apply it once.

    The residual flow is fused only when ``residual_active`` (stage 2 and 3) and the model
    returns one.
    """
    outputs = model_outputs(model, image)
    flow = outputs.get("residual_flow_lowres") if residual_active else None
    return Correction(outputs["params"], flow, apply_correction(image, outputs["params"], flow), image)


def identity_prediction(image: torch.Tensor) -> torch.Tensor:
    """The identity warp's prediction for ``image`` ``(B, 3, H, W)`` (the warp, not a copy)."""
    params = identity_params(image.shape[0], device=image.device, dtype=image.dtype)
    return apply_correction(image, params, None).prediction


def ground_truth_prediction(image: torch.Tensor, gt_params: torch.Tensor) -> torch.Tensor:
    """Prediction of the recorded ground-truth parametric warp, ``gt_params (B, 8)``."""
    return apply_correction(image, gt_params.to(image), None).prediction


class ScoreAccumulator:
    """Sample-weighted running mean of proxy-score dicts."""

    def __init__(self) -> None:
        self.sums = {key: 0.0 for key in PROXY_KEYS}
        self.count = 0

    def add(self, scores: dict[str, float], count: int) -> None:
        for key in PROXY_KEYS:
            self.sums[key] += float(scores[key]) * count
        self.count += count

    def mean(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no samples were scored (empty loader?)")
        return {key: value / self.count for key, value in self.sums.items()}


@dataclass(frozen=True)
class SubsetScores:
    """Mean proxy scores of the model and its baselines on one subset.

    ``constant_lens`` scores the model's own mean parameters ``constant_params`` applied to every
    image (no residual); ``param_correlations`` maps each name in ``PARAM_NAMES`` to the Pearson
    correlation of the predicted parameters with ground truth over the subset (``None`` where
    either side does not vary). Both are ``None`` when not asked for or not available.
    """

    model: dict[str, float]
    identity: dict[str, float]
    ground_truth: dict[str, float] | None
    sample_count: int
    loss_sums: dict[str, float]
    constant_lens: dict[str, float] | None = None
    constant_params: tuple[float, ...] | None = None
    param_correlations: dict[str, float | None] | None = None


def pearson_per_column(pred: torch.Tensor, truth: torch.Tensor) -> list[float | None]:
    """Pearson correlation of each column of ``pred`` and ``truth`` ``(N, K)`` -> ``K`` values.

    A column where either side has (numerically) no spread, or ``N < 2``, gives ``None``: a model
    that predicts the same value for every image has no correlation to report.
    """
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"pred and truth must both be (N, K) of the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(truth.shape)}")
    a = pred.double() - pred.double().mean(dim=0)
    b = truth.double() - truth.double().mean(dim=0)
    out: list[float | None] = []
    for k in range(pred.shape[1]):
        na, nb = float(a[:, k].norm()), float(b[:, k].norm())
        scale = max(1.0, float(pred[:, k].double().abs().max()), float(truth[:, k].double().abs().max()))
        if pred.shape[0] < 2 or na <= 1e-9 * scale or nb <= 1e-9 * scale:
            out.append(None)
        else:
            value = float((a[:, k] * b[:, k]).sum()) / (na * nb)
            out.append(max(-1.0, min(1.0, value)) if math.isfinite(value) else None)
    return out


def _score_constant_lens(params: torch.Tensor, batches: Iterable[Mapping], *, device: torch.device,
                         max_batches: int | None) -> dict[str, float]:
    """Mean proxy of one parameter vector ``(8,)`` applied to every input of ``batches`` (no model)."""
    acc = ScoreAccumulator()
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        image = batch["input_image"].to(device, non_blocking=True)
        target = batch["target_image"].to(device, non_blocking=True)
        fixed = params.to(image).expand(image.shape[0], -1)
        acc.add(proxy_score_batch(apply_correction(image, fixed, None).prediction.float(), target.float()),
                image.shape[0])
    return acc.mean()


@torch.no_grad()
def score_subset(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    residual_active: bool,
    device: torch.device,
    ground_truth: Mapping[str, torch.Tensor] | None = None,
    max_batches: int | None = None,
    loss_fn=None,
    with_baselines: bool = True,
    constant_lens: bool = False,
) -> SubsetScores:
    """Score the model and the identity warp on exactly the same samples.

    ``ground_truth`` maps ``image_id`` to its ``(8,)`` parameters; the ground-truth warp is scored
    and the predictions are correlated with it only when every sample has one.
    ``loss_fn(pred, target, correction) -> dict`` adds loss sums. With ``with_baselines=False``
    identity and ground truth are not scored (they are constant over a run, so the trainer scores
    them once). With ``constant_lens=True`` the mean of the model's parameters over the subset is
    applied to every input and scored beside the model, in a second pass over ``batches`` (which
    must then be iterable twice, as a ``DataLoader`` is) that does not run the model again.
    """
    was_training = model.training
    model.eval()
    acc_model, acc_identity, acc_gt = ScoreAccumulator(), ScoreAccumulator(), ScoreAccumulator()
    loss_sums: dict[str, float] = {}
    gt_complete = ground_truth is not None
    predicted, truth = [], []
    params_sum = torch.zeros(len(PARAM_NAMES), dtype=torch.float64)
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            check_batch_range(batch, f"validation batch {index}")  # names the sample, before the proxy would
            image = batch["input_image"].to(device, non_blocking=True)
            target = batch["target_image"].to(device, non_blocking=True)
            count = image.shape[0]
            correction = correct(model, image, residual_active)
            acc_model.add(proxy_score_batch(correction.prediction.float(), target.float()), count)
            params_sum += correction.params.detach().double().sum(dim=0).cpu()
            if with_baselines:
                # baselines recur in every run on these pairs: memoized by content
                acc_identity.add(proxy_score_batch(identity_prediction(image).float(), target.float(), memo=True),
                                 count)
            ids = list(batch.get("image_id", []))
            gt_complete = gt_complete and len(ids) == count and all(i in ground_truth for i in ids)
            if gt_complete:
                gt = torch.stack([ground_truth[i] for i in ids]).to(image)
                predicted.append(correction.params.detach().double().cpu())
                truth.append(gt.double().cpu())
                if with_baselines:
                    acc_gt.add(proxy_score_batch(ground_truth_prediction(image, gt).float(), target.float(),
                                                 memo=True), count)
            if loss_fn is not None:
                for key, value in loss_fn(correction.prediction, target, correction).items():
                    loss_sums[key] = loss_sums.get(key, 0.0) + float(value) * count
    finally:
        model.train(was_training)
    gt_complete = gt_complete and acc_model.count > 0
    constant = params_sum / acc_model.count if constant_lens and acc_model.count else None
    correlations = None
    if gt_complete:
        correlations = dict(zip(PARAM_NAMES, pearson_per_column(torch.cat(predicted), torch.cat(truth))))
    return SubsetScores(
        model=acc_model.mean(),
        identity=acc_identity.mean() if with_baselines else {},
        ground_truth=acc_gt.mean() if with_baselines and gt_complete else None,
        sample_count=acc_model.count,
        loss_sums=loss_sums,
        constant_lens=(_score_constant_lens(constant, batches, device=device, max_batches=max_batches)
                       if constant is not None else None),
        constant_params=tuple(float(v) for v in constant) if constant is not None else None,
        param_correlations=correlations,
    )
