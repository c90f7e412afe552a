"""Parameter deltas: how far each group's weights moved in the step, exactly.

Writes ``param_delta_{group}`` (the L2 norm of ``theta_after - theta_before`` over the group) for
every measured group, and on an epoch's first step ``weights_jump_before_epoch``: how far the
weights moved between the previous epoch's last step and this one's first (0 unless something
between epochs loads or edits them; ``weights_continue_across_epochs`` judges it). One persistent
copy of the weights, updated in place with foreach kernels (one subtract and one copy over all
groups, one norm per group): no per-step allocation, no per-tensor host read.

State: whether the epoch in hand still owes its ``weights_jump_before_epoch``, so a resumed run
writes it on the same steps as the uninterrupted one; a resumed run measures that jump from the
weights it resumed with (the copy of the weights itself is not saved: the checkpoint's model is
that copy).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.instrumentation import ParamDeltaTracker
from autohdr.diagnosis.observers.base import Observer, StepInfo


class ParamDeltaObserver(Observer):
    """``param_delta_{group}`` after every optimizer step."""

    name = "param_deltas"

    def __init__(self, groups: Mapping[str, list[nn.Parameter]]) -> None:
        self.groups = groups
        self._tracker: ParamDeltaTracker | None = None
        self._jump_due = False            # the next batch start measures the weights' change since the last step
        self._jump: torch.Tensor | None = None
        self._epoch: int | None = None
        self._resumed_epoch: int | None = None
        self._resuming = False

    def on_train_start(self) -> None:
        # Deltas start from the weights as they are now (after any loading); a resumed run measures
        # the next epoch jump from them too, as the uninterrupted run measures it from its last step.
        self._tracker = ParamDeltaTracker(self.groups) if self._resuming else None
        self._resuming = False

    def on_train_epoch_start(self, epoch: int) -> None:
        if epoch != self._resumed_epoch:  # a new epoch, not the resumed one continuing
            self._jump_due = True
        self._epoch, self._resumed_epoch = epoch, None

    def on_train_batch_start(self, batch) -> None:
        if self._tracker is None:
            self._tracker = ParamDeltaTracker(self.groups)
        elif self._jump_due:
            jumps = list(self._tracker.measure().values())
            self._jump = torch.stack(jumps).square().sum().sqrt() if jumps else None
        self._jump_due = False

    def step_tensors(self, step: StepInfo) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        if self._jump is not None:
            tensors["weights_jump_before_epoch"], self._jump = self._jump, None
        if self._tracker is None:
            self._tracker = ParamDeltaTracker(self.groups)
        tensors.update((f"param_delta_{name}", value) for name, value in self._tracker.measure().items())
        return tensors

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "jump_due": self._jump_due}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._jump_due = bool(state.get("jump_due", False))
        self._epoch = self._resumed_epoch = state.get("epoch")
        self._resuming = True
