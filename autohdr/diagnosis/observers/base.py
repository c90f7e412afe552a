"""What every observer is: a class with the hooks of one concern, and the step they look at.

An observer overrides only the hooks its concern needs (the rest are no-ops here). Per training
step :class:`~autohdr.diagnosis.hooks.Instrumentation` calls, in its observers' order::

    on_train_batch_start(batch)       the batch is on the device (range, fingerprint inputs)
    on_after_backward(norms)          gradients exist, before any clipping
    step_tensors(step) -> {name: t}   the step's figures as device tensors (one value each; "_name":
                                      any shape, read but not written), after the optimizer step
    -- one host read of every observer's tensors together --
    step_fields(record, step)         plain fields from the host values (flags, digests, warnings)

``state_dict()`` returns what a resumed run needs to continue the observer's figures exactly, or
``None`` when it has nothing worth resuming; ``load_state_dict`` takes it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from autohdr.lens.evaluation import Correction
from autohdr.lens.losses import LossWeights, composite_loss
from autohdr.lens.stages import StageSpec

#: ``loss_fn(correction, target) -> (total (0-d), {component: 0-d tensor})``
LossFn = Callable[[Correction, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def default_loss_fn(spec: StageSpec, weights: LossWeights | None = None) -> LossFn:
    """autohdr's composite loss for ``spec``'s stage (the trainer's loss, with default weights)."""
    weights = weights or LossWeights()

    def loss_fn(correction: Correction, target: torch.Tensor):
        return composite_loss(correction.loss_prediction.float(), target.float(), weights=weights,
                              residual_flow_lowres=correction.residual_flow_lowres,
                              final_grid=correction.warp.final_grid if spec.jacobian_term else None,
                              residual_terms=spec.residual_terms, jacobian_term=spec.jacobian_term)
    return loss_fn


@dataclass
class StepInfo:
    """One optimizer step as the observers see it (what ``on_train_batch_end`` was given).

    ``batch`` is the step's batch (``None`` when the instrumentation is off or none was passed),
    ``step`` the step's number (1-based, already counted), ``host`` the host values of every
    tensor the observers returned from ``step_tensors`` (filled in after the one read).
    """

    loss: torch.Tensor
    correction: Correction | None
    components: Mapping[str, torch.Tensor]
    batch: Mapping | None
    grad_norm_total: torch.Tensor | None = None
    clip_norm: float | None = None
    grad_norm_at_step: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0
    host: dict[str, Any] = field(default_factory=dict)


class Observer:
    """One concern of the instrumentation (see the module docstring for when each hook runs)."""

    #: the observer's key in ``Instrumentation.observers`` and in its ``state_dict()``
    name: str = ""

    def on_train_start(self) -> None:
        """The run (or a resumed part of it) starts; the weights are as they will be trained."""

    def on_train_epoch_start(self, epoch: int) -> None:
        """An epoch starts."""

    def on_train_batch_start(self, batch: Mapping | None) -> None:
        """The step's batch (``None``: not given, or the instrumentation is off)."""

    def on_after_backward(self, group_grad_norms: Mapping[str, torch.Tensor] | None) -> None:
        """Gradients exist (after DDP's all-reduce), before clipping; ``group_grad_norms``: measured elsewhere."""

    def step_tensors(self, step: StepInfo) -> Mapping[str, torch.Tensor]:
        """The step's figures as device tensors, read in one transfer with everyone else's."""
        return {}

    def step_fields(self, record: dict, step: StepInfo) -> None:
        """Add plain fields to the step's record (its tensors are already host values in it)."""

    def state_dict(self) -> dict | None:
        """What a resumed run needs to continue this observer's figures exactly (``None``: nothing)."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


def overrides(observer: Observer, hook: str) -> bool:
    """Whether ``observer`` does anything at ``hook`` (the Instrumentation skips the no-ops)."""
    return getattr(type(observer), hook) is not getattr(Observer, hook)


def read_once(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Every tensor of a step on the host in one transfer: the record's figures (one value each) as
    floats, private ones (names starting with ``_``, any shape) as float64 CPU tensors of their
    shape. Each is converted to float64 on ``device`` first, exactly as it would be alone."""
    names = list(tensors)
    if not names:
        return {}
    flat = [tensors[n].detach().to(device, torch.float64).reshape(-1 if n.startswith("_") else 1) for n in names]
    values = torch.cat(flat).cpu() if len(flat) > 1 else flat[0].cpu()
    listed = values.tolist()
    out: dict[str, Any] = {}
    offset = 0
    for name, piece in zip(names, flat):
        size = piece.numel()
        if name.startswith("_"):
            out[name] = values[offset:offset + size].reshape(tensors[name].shape)
        else:  # a figure of the record: one value (as before, whatever its shape)
            out[name] = listed[offset]
        offset += size
    return out
