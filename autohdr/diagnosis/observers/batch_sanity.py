"""Batch sanity: every training batch's value range, its non-finite count and which samples it holds.

Writes ``batch_min`` / ``batch_max`` (over input and target images, non-finite values left out),
``batch_nonfinite`` (how many values are NaN or infinite), ``batch_fingerprint`` (16 hex digits of
the ordered sample ids, else of the pooled input pixels to 3 decimals) and, for a batch out of
``[0, 1]`` or not finite, ``batch_bad_sample`` naming the first bad sample. State: none.

Cheap by construction: one ``aminmax`` pass per image gives the range, and the count is 0 exactly
when that range is finite (NaN and infinities propagate into it), so the non-finite count, the
per-sample search and their host reads run only for a batch that has a non-finite value or is out
of range. The pooled pixels of an id-less batch travel in the step's one host read.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.diagnosis.observers.base import Observer, StepInfo

#: Images are ``[0, 1]``; resampling may overshoot by float rounding only.
RANGE_TOLERANCE = 1e-3

#: the pooled input of an id-less batch, read with the step's figures (see :func:`batch_identity`)
_POOLED = "_batch_pooled_input"


def _images(batch: Mapping) -> list[torch.Tensor]:
    return [batch[k] for k in ("input_image", "target_image") if isinstance(batch.get(k), torch.Tensor)]


def batch_range_tensors(batch: Mapping) -> dict[str, torch.Tensor]:
    """``batch_min`` / ``batch_max`` over input and target images and ``batch_nonfinite`` (count), 0-d:
    the exact figures (non-finite values count as 0.5 in the range)."""
    images = _images(batch)
    if not images:
        return {}
    finite = [torch.nan_to_num(x.detach(), nan=0.5, posinf=0.5, neginf=0.5) for x in images]
    return {"batch_min": torch.stack([x.amin() for x in finite]).amin().float(),
            "batch_max": torch.stack([x.amax() for x in finite]).amax().float(),
            "batch_nonfinite": sum((~torch.isfinite(x.detach())).sum() for x in images).float()}


def batch_identity(batch: Mapping, record: Mapping[str, Any], pooled: torch.Tensor | None = None) -> dict[str, Any]:
    """``batch_fingerprint`` (16 hex digits of the ordered sample ids, else of the pooled input) and,
    when the batch is out of ``[0, 1]`` or not finite, ``batch_bad_sample`` naming the first bad sample.

    ``pooled``: the input already pooled for the checksum (:func:`pooled_input`, on the host)."""
    ids = [str(i) for i in batch.get("image_id", [])]
    if ids:
        fingerprint = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]
    else:
        # pooling an already pooled (B, C, <=8, <=8) tensor again leaves it as it is: the same digest
        fingerprint = tensor_checksum(pooled if pooled is not None else batch["input_image"].detach().float(), 3)
    out: dict[str, Any] = {"batch_fingerprint": fingerprint}
    out_of_range = record.get("batch_min", 0.0) < -RANGE_TOLERANCE or record.get("batch_max", 1.0) > 1 + RANGE_TOLERANCE
    if out_of_range or record.get("batch_nonfinite", 0.0) > 0:
        worst = None
        for index in range(int(batch["input_image"].shape[0])):
            sample = [batch[k][index] for k in ("input_image", "target_image")
                      if isinstance(batch.get(k), torch.Tensor)]
            nonfinite = any(not bool(torch.isfinite(x).all()) for x in sample)
            low = min(float(torch.nan_to_num(x, nan=0.5).amin()) for x in sample)
            high = max(float(torch.nan_to_num(x, nan=0.5).amax()) for x in sample)
            if nonfinite or low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
                worst = {"index": index, "image_id": ids[index] if index < len(ids) else None,
                         "nonfinite": nonfinite, "min": low, "max": high}
                break
        out["batch_bad_sample"] = worst
    return out


def pooled_input(image: torch.Tensor, pool: int = 8) -> torch.Tensor:
    """The input ``(B, C, H, W)`` as :func:`~autohdr.diagnosis.checksum.tensor_checksum` summarizes it
    (float64, average-pooled to at most ``pool x pool``), still on its device."""
    values = image.detach().float().to(torch.float64)
    h, w = values.shape[-2:]
    return F.adaptive_avg_pool2d(values, (min(pool, h), min(pool, w)))


class BatchSanityObserver(Observer):
    """Range, non-finite count and fingerprint of every training batch (see the module docstring)."""

    name = "batch_sanity"

    def __init__(self) -> None:
        self._batch: Mapping | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, batch: Mapping | None) -> None:
        self._batch, self._tensors = batch, {}
        if batch is None:
            return
        images = _images(batch)
        if images:
            bounds = [torch.aminmax(x.detach()) for x in images]
            low = torch.stack([b.min for b in bounds]).amin().float()
            high = torch.stack([b.max for b in bounds]).amax().float()
            # 0 exactly when the range is finite, i.e. when every value is; else the exact count is taken later
            self._tensors = {"batch_min": low, "batch_max": high,
                             "batch_nonfinite": (~torch.isfinite(torch.stack([low, high]))).sum().float()}
        image, ids = batch.get("input_image"), batch.get("image_id")
        if (ids is None or len(ids) == 0) and isinstance(image, torch.Tensor) and image.ndim == 4:
            self._tensors[_POOLED] = pooled_input(image)

    def step_tensors(self, step: StepInfo) -> dict[str, torch.Tensor]:
        return self._tensors

    def step_fields(self, record: dict, step: StepInfo) -> None:
        batch = self._batch
        if batch is None:
            return
        if record.get("batch_nonfinite", 0.0) > 0:  # rare: a non-finite value; the exact figures, read now
            record.update({k: float(v) for k, v in batch_range_tensors(batch).items()})
        record.update(batch_identity(batch, record, step.host.get(_POOLED)))
        self._batch, self._tensors = None, {}

    def exact_fields(self) -> dict[str, Any]:
        """The batch in hand's figures, read now (for an ``error`` record: the step will not end)."""
        if self._batch is None or not self._tensors:
            return {}
        fields: dict[str, Any] = {k: float(v) for k, v in batch_range_tensors(self._batch).items()}
        fields.update(batch_identity(self._batch, fields))
        return fields
