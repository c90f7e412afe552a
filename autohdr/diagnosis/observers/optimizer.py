"""The optimizer: every param group's learning rate each step, and whether it covers the parameters.

Writes ``lr_groups`` (every param group's lr) in each ``train_step`` and, with ``coverage``,
``optimizer_coverage`` in ``run_end``: parameters that got a gradient the optimizer does not hold
(created after it, or left out of it) and optimized parameters that never got one (``skip``:
parameters the stage switches off, e.g. the residual head in stage 1). State: the steps observed
and the names of the parameters seen with a gradient, so a resumed run reports the whole run.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.observers.base import Observer, StepInfo


class OptimizerCoverage:
    """Which parameters got a gradient (at any step) versus which the optimizer updates.

    ``observe`` after each backward looks only at the parameters not yet seen with a gradient (once
    every parameter has had one, a step costs nothing); ``report`` names the two kinds of mismatch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, skip: Iterable[nn.Parameter] = ()) -> None:
        self.optimizer = optimizer
        self._skip = {id(p) for p in skip}
        self._with_grad: set[int] = set()
        self._pending: list[nn.Parameter] | None = None
        self.steps = 0

    def observe(self, model: nn.Module) -> None:
        self.steps += 1
        if self._pending is None:
            self._pending = [p for p in model.parameters() if id(p) not in self._with_grad]
        still = []
        for param in self._pending:
            if param.grad is not None:
                self._with_grad.add(id(param))
            else:
                still.append(param)
        self._pending = still

    def report(self, model: nn.Module) -> dict[str, Any] | None:
        if self.optimizer is None or self.steps == 0:
            return None
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        names = [(name, id(p)) for name, p in model.named_parameters()]
        return {
            "steps_observed": self.steps,
            "optimized_tensors": len(optimized),
            "grad_not_optimized": [n for n, i in names if i in self._with_grad and i not in optimized],
            "optimized_never_grad": [n for n, i in names if i in optimized and i not in self._with_grad
                                     and i not in self._skip],
        }

    def state_dict(self, model: nn.Module) -> dict:
        return {"steps": self.steps, "with_grad": [n for n, p in model.named_parameters() if id(p) in self._with_grad]}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        seen = set(state.get("with_grad", []))
        self.steps = int(state.get("steps", 0))
        self._with_grad = {id(p) for n, p in model.named_parameters() if n in seen}
        self._pending = None


class OptimizerObserver(Observer):
    """``lr_groups`` every step; ``optimizer_coverage`` at the end of the run (with ``coverage``)."""

    name = "optimizer"

    def __init__(self, optimizer: torch.optim.Optimizer | None, model: nn.Module, *, coverage: bool,
                 skip: Iterable[nn.Parameter] = ()) -> None:
        self.optimizer = optimizer
        self.model = model
        self.coverage = OptimizerCoverage(optimizer, skip) if coverage else None

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        if self.coverage is not None:
            self.coverage.optimizer = optimizer

    def on_after_backward(self, group_grad_norms) -> None:
        if self.coverage is not None:
            self.coverage.observe(self.model)

    def step_fields(self, record: dict, step: StepInfo) -> None:
        if self.optimizer is not None and "lr_groups" not in record:
            record["lr_groups"] = [float(group["lr"]) for group in self.optimizer.param_groups]

    def report(self) -> dict[str, Any] | None:
        """``run_end.optimizer_coverage`` as it reads now (``None`` without coverage or steps)."""
        return self.coverage.report(self.model) if self.coverage is not None else None

    def state_dict(self) -> dict | None:
        return self.coverage.state_dict(self.model) if self.coverage is not None else None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.coverage is not None:
            self.coverage.load_state_dict(state, self.model)


def optimizer_groups(optimizer: torch.optim.Optimizer | None,
                     groups: Mapping[str, list[nn.Parameter]]) -> list[dict[str, Any]] | None:
    """Each optimizer param group's hyperparameters (``lr``, ``eps``, ``betas``, ``weight_decay``,
    ``momentum`` where it has them), its tensor count and the named groups its parameters belong to."""
    if optimizer is None:
        return None
    owner = {id(p): name for name, params in groups.items() for p in params}
    out = []
    for group in optimizer.param_groups:
        item: dict[str, Any] = {"tensors": len(group["params"]),
                                "groups": sorted({owner[id(p)] for p in group["params"] if id(p) in owner})}
        for key in ("lr", "eps", "betas", "weight_decay", "momentum"):
            value = group.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                item[key] = float(value)
            elif isinstance(value, (tuple, list)):
                item[key] = [float(v) for v in value]
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                item[key] = float(value)
        out.append(item)
    return out
