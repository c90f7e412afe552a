"""The loss: the step's total, its parts, and which fields are parts.

Writes ``loss`` (the step's total, averaged over ranks under DDP), each component the loop passed
(raw and ``*_weighted`` for autohdr's loss: ``pixel``, ``ssim``, ``edge``, ... ``jacobian``) and
``loss_parts`` (the sorted names of those components, so ``loss_not_regularizer_bound`` knows which
fields make up the loss). State: none (the epoch's losses are the validation observer's).
"""

from __future__ import annotations

import torch

from autohdr.diagnosis.observers.base import Observer, StepInfo


class LossObserver(Observer):
    """The step's loss and its parts."""

    name = "loss"

    def step_tensors(self, step: StepInfo) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {"loss": step.loss.detach()}
        tensors.update(step.components)
        return tensors

    def step_fields(self, record: dict, step: StepInfo) -> None:
        if step.components:
            record["loss_parts"] = sorted(step.components)
