"""Forward warp and evaluation shared by the trainer, the debug modes and the helper scripts.

``correct(model, image, residual_active)`` is the one place where a model's outputs become a
prediction: parametric grid, optional residual fusion, one ``grid_sample``. Training, validation,
the probe and ``debug_compare_identity`` all call it, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.lens.geometry import WarpResult, apply_correction, identity_params
from autohdr.lens.proxy import proxy_score_batch

PROXY_KEYS: tuple[str, ...] = ("total", "edge", "line", "grad", "ssim", "mae", "hard_fail")


@dataclass(frozen=True)
class Correction:
    """Model outputs with the warp they produce. ``params (B, 8)``; flow ``(B, 2, h, w)`` or None."""

    params: torch.Tensor
    residual_flow_lowres: torch.Tensor | None
    warp: WarpResult

    @property
    def prediction(self) -> torch.Tensor:
        return self.warp.prediction


def model_outputs(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` and check it returns a mapping with ``params`` ``(B, 8)``."""
    outputs = model(image)
    if not isinstance(outputs, Mapping) or "params" not in outputs:
        raise ValueError("the model's forward must return a dict with 'params' (B, 8) "
                         f"and optionally 'residual_flow_lowres'; got {type(outputs).__name__}")
    return outputs


def correct(model: nn.Module, image: torch.Tensor, residual_active: bool) -> Correction:
    """Predict the warp for ``image`` ``(B, 3, H, W)`` and apply it once.

    The residual flow is fused only when ``residual_active`` (stage 2 and 3) and the model
    returns one.
    """
    outputs = model_outputs(model, image)
    flow = outputs.get("residual_flow_lowres") if residual_active else None
    return Correction(outputs["params"], flow, apply_correction(image, outputs["params"], flow))


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
    """Mean proxy scores of the model, identity and (where known) ground truth on one subset."""

    model: dict[str, float]
    identity: dict[str, float]
    ground_truth: dict[str, float] | None
    sample_count: int
    loss_sums: dict[str, float]


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
) -> SubsetScores:
    """Score the model and the identity warp on exactly the same samples.

    ``ground_truth`` maps ``image_id`` to its ``(8,)`` parameters; the ground-truth warp is scored
    only when every sample has one. ``loss_fn(pred, target, correction) -> dict`` adds loss sums.
    With ``with_baselines=False`` only the model is scored (identity and ground truth are
    constant over a run, so the trainer scores them once).
    """
    was_training = model.training
    model.eval()
    acc_model, acc_identity, acc_gt = ScoreAccumulator(), ScoreAccumulator(), ScoreAccumulator()
    loss_sums: dict[str, float] = {}
    gt_complete = ground_truth is not None
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            image = batch["input_image"].to(device, non_blocking=True)
            target = batch["target_image"].to(device, non_blocking=True)
            count = image.shape[0]
            correction = correct(model, image, residual_active)
            acc_model.add(proxy_score_batch(correction.prediction.float(), target.float()), count)
            if with_baselines:
                acc_identity.add(proxy_score_batch(identity_prediction(image).float(), target.float()), count)
            ids = list(batch.get("image_id", []))
            if with_baselines and gt_complete and ids and all(i in ground_truth for i in ids):
                gt = torch.stack([ground_truth[i] for i in ids]).to(image)
                acc_gt.add(proxy_score_batch(ground_truth_prediction(image, gt).float(), target.float()), count)
            else:
                gt_complete = False
            if loss_fn is not None:
                for key, value in loss_fn(correction.prediction, target, correction).items():
                    loss_sums[key] = loss_sums.get(key, 0.0) + float(value) * count
    finally:
        model.train(was_training)
    return SubsetScores(
        model=acc_model.mean(),
        identity=acc_identity.mean() if with_baselines else {},
        ground_truth=acc_gt.mean() if gt_complete and acc_gt.count == acc_model.count > 0 else None,
        sample_count=acc_model.count,
        loss_sums=loss_sums,
    )
