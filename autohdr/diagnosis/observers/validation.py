"""Validation: the model's proxy score on the validation data, its baselines, and the best epoch.

Writes each ``val_epoch`` record's ``val_batch_fingerprint`` (the first validation batch's ids and
pixels: the same data every epoch?), ``val_proxy_{total,edge,line,grad,ssim,mae}``, ``val_loss``,
``val_sample_count``, the ``identity_proxy_*`` and (with ground truth) ``gt_proxy_*`` baselines,
and at the final validation ``constant_lens_proxy_*`` (the model's mean lens on every image),
``pred_gt_corr_*`` and, with a residual, ``val_proxy_no_residual_*``; ``best_val_proxy_total`` and
``is_best``. Beside it, the training epoch in hand: ``train_epoch_loss_mean``,
``train_epoch_steps`` and ``val_ids_match_train`` (train == val in the overfit modes).

State: the best score and its epoch, and the epoch in hand's training losses and sample ids, so a
run resumed in the middle of an epoch writes exactly the figures the uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.diagnosis.observers.base import LossFn, Observer, StepInfo
from autohdr.lens.evaluation import score_subset
from autohdr.lens.stages import StageSpec


def validation_fingerprint(val_batches: Iterable[Mapping]) -> dict[str, str]:
    """``val_batch_fingerprint``: 16 hex digits of the first validation batch (its sample ids and
    its input pixels to 3 decimals), to check that validation scores the same data every epoch."""
    first = next(iter(val_batches), None)
    if first is None or not isinstance(first.get("input_image"), torch.Tensor):
        return {}
    ids = "\n".join(str(i) for i in first.get("image_id", []))
    pixels = tensor_checksum(first["input_image"].detach().float(), 3)
    return {"val_batch_fingerprint": hashlib.sha256(f"{ids}|{pixels}".encode("utf-8")).hexdigest()[:16]}


class IdTap:
    """Re-iterable view of validation batches that collects their sample ids as they pass."""

    def __init__(self, batches: Iterable[Mapping]) -> None:
        self.batches = batches
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        self.ids = []
        for batch in self.batches:
            self.ids.extend(str(i) for i in batch.get("image_id", []))
            yield batch


class FiniteOutputs(nn.Module):
    """Runs ``model`` unchanged and calls ``on_fail(names)`` when one of the outputs ``names`` it
    returns is not finite (one device-wide check per output and batch)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], on_fail: Callable[[list[str]], None]) -> None:
        super().__init__()
        self.model = model
        self._names = names
        self._on_fail = on_fail

    def forward(self, image: torch.Tensor):
        outputs = self.model(image)
        if isinstance(outputs, Mapping):
            bad = [name for name in self._names
                   if isinstance(outputs.get(name), torch.Tensor) and not bool(torch.isfinite(outputs[name]).all())]
            if bad:
                self._on_fail(bad)
        return outputs


class ValidationObserver(Observer):
    """Scores, baselines and the best epoch; the training epoch's accumulators (see the module docstring).

    Args:
        detailed: the instrumentation is on: fingerprint, sample ids, constant lens, no-residual pass.
        on_non_finite: called with the names of model outputs that are not finite in validation.
    """

    name = "validation"

    def __init__(self, model: nn.Module, spec: StageSpec, device: torch.device, *, loss_fn: LossFn,
                 ground_truth: Mapping[str, torch.Tensor] | None, detailed: bool,
                 on_non_finite: Callable[[list[str]], None]) -> None:
        self.model, self.spec, self.device = model, spec, device
        self.loss_fn = loss_fn
        self.ground_truth = ground_truth
        self.detailed = detailed
        self._on_non_finite = on_non_finite
        self.best_score = -math.inf
        self.best_epoch = -1
        self._baselines: dict[str, float] | None = None
        self._epoch: int | None = None
        self._resumed_epoch: int | None = None
        self._epoch_ids: set[str] = set()
        self._epoch_losses: list[float] = []

    # ------------------------------------------------------------------ the training epoch in hand
    def on_train_epoch_start(self, epoch: int) -> None:
        if epoch != self._resumed_epoch:
            self._epoch_ids, self._epoch_losses = set(), []  # this epoch's training samples and losses
        self._resumed_epoch = None
        self._epoch = epoch

    def step_fields(self, record: dict, step: StepInfo) -> None:
        self._epoch_losses.append(record["loss"])
        if step.batch is not None:
            self._epoch_ids.update(str(i) for i in step.batch.get("image_id", []))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def evaluate(self, val_batches: Iterable[Mapping], *, final: bool) -> dict:
        """The model's validation figures as they are now (no best tracking)."""
        record: dict[str, Any] = {}
        loss_fn = self.loss_fn

        def val_loss(pred, target, correction):
            return {"val_loss": loss_fn(correction, target)[0]}

        need_baselines = self._baselines is None
        if self.detailed:
            record.update(validation_fingerprint(val_batches))
            val_batches = IdTap(val_batches)
        # A finite last training loss does not make the updated weights usable (a huge step can
        # overflow the next forward): outputs are checked so such a run stops with a clear error.
        used = ("params", "residual_flow_lowres") if self.spec.residual_active else ("params",)
        checked = FiniteOutputs(self.model, used, self._on_non_finite).train(self.model.training)
        scores = score_subset(checked, val_batches, residual_active=self.spec.residual_active,
                              device=self.device, ground_truth=self.ground_truth, loss_fn=val_loss,
                              with_baselines=need_baselines, constant_lens=final and self.detailed)
        if need_baselines:
            self._baselines = {f"identity_proxy_{k}": v for k, v in scores.identity.items()}
            if scores.ground_truth is not None:
                self._baselines.update({f"gt_proxy_{k}": v for k, v in scores.ground_truth.items()})
        record.update({f"val_proxy_{k}": v for k, v in scores.model.items()})
        # beats_constant_lens: the model's own mean lens on every image; where ground truth is known,
        # the per-parameter correlation of the predictions with it
        record.update({f"constant_lens_proxy_{k}": v for k, v in (scores.constant_lens or {}).items()})
        record.update({f"pred_gt_corr_{k}": v for k, v in (scores.param_correlations or {}).items()})
        record.update(self._baselines)
        if self.spec.residual_active and self.detailed and final:
            # The same model with its residual zeroed (the parametric warp alone): does the residual help?
            # residual_helps judges the last validation only, so only the final one pays this pass.
            without = score_subset(self.model, val_batches, residual_active=False, device=self.device,
                                   with_baselines=False)
            record.update({f"val_proxy_no_residual_{k}": v for k, v in without.model.items()})
        record["val_sample_count"] = scores.sample_count
        record["val_loss"] = scores.loss_sums["val_loss"] / max(1, scores.sample_count)
        if isinstance(val_batches, IdTap) and val_batches.ids and self._epoch_losses:
            # train == val (overfit modes): the epoch's mean training loss on the same samples
            record["val_ids_match_train"] = set(val_batches.ids) == self._epoch_ids
            record["train_epoch_loss_mean"] = sum(self._epoch_losses) / len(self._epoch_losses)
            record["train_epoch_steps"] = len(self._epoch_losses)
        return record

    def track_best(self, record: dict, epoch: int) -> None:
        """``best_val_proxy_total`` and ``is_best`` (this epoch's score is the best so far) into ``record``."""
        improved = record["val_proxy_total"] > self.best_score
        if improved:
            self.best_score, self.best_epoch = record["val_proxy_total"], epoch
        record.update({"best_val_proxy_total": self.best_score, "is_best": improved})

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "epoch": self._epoch,
                "epoch_losses": [float(x) for x in self._epoch_losses], "epoch_ids": sorted(self._epoch_ids)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score = float(state.get("best_score", -math.inf))
        self.best_epoch = int(state.get("best_epoch", -1))
        self._epoch_losses = [float(x) for x in state.get("epoch_losses", [])]
        self._epoch_ids = {str(i) for i in state.get("epoch_ids", [])}
        epoch = state.get("epoch")
        self.resume_in(int(epoch) if epoch is not None else None)

    def resume_in(self, epoch: int | None) -> None:
        """The next ``on_train_epoch_start(epoch)`` continues that epoch's figures instead of starting over."""
        self._epoch = self._resumed_epoch = epoch
