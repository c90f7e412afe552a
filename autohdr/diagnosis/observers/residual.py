"""Residual activity: is the residual branch getting gradients, moving and contributing?

Writes ``residual_head_grad_is_zero`` and ``residual_head_param_delta_is_zero`` in every
``train_step`` (``None`` where the stage switches the branch off, or no residual group was named:
off is not a failure), and a ``warning`` record (``residual_inactive``) each time
``residual_contrib_px_mean`` stays below ``threshold_px`` for ``patience`` consecutive steps.
Reads the step's ``grad_norm_residual_head``, ``param_delta_residual_head`` and
``residual_contrib_px_mean`` from the record (the gradient, delta and geometry observers write
them). State: the inactivity count and how many warnings fired.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from autohdr.diagnosis.instrumentation import ResidualInactivityMonitor
from autohdr.diagnosis.observers.base import Observer, StepInfo


class ResidualActivityObserver(Observer):
    """The residual branch's zero flags and the inactivity warning (see the module docstring)."""

    name = "residual_activity"

    def __init__(self, residual_active: bool, *, threshold_px: float, patience: int,
                 write: Callable[[dict], None], info: Callable[[str], None]) -> None:
        self.residual_active = residual_active
        self.monitor = ResidualInactivityMonitor(threshold_px, patience) if residual_active else None
        self._write, self._info = write, info

    def step_fields(self, record: dict, step: StepInfo) -> None:
        measured = "grad_norm_residual_head" in record and "param_delta_residual_head" in record
        if not self.residual_active or not measured:
            record["residual_head_grad_is_zero"] = None
            record["residual_head_param_delta_is_zero"] = None
        else:
            record["residual_head_grad_is_zero"] = record["grad_norm_residual_head"] == 0.0
            record["residual_head_param_delta_is_zero"] = record["param_delta_residual_head"] == 0.0
        monitor = self.monitor
        contrib = record.get("residual_contrib_px_mean")
        if monitor is not None and contrib is not None and monitor.update(contrib):
            message = (f"residual branch inactive: contribution below {monitor.threshold_px} px for "
                       f"{monitor.patience} consecutive steps (warning #{monitor.fired})")
            self._write({"kind": "warning", "name": "residual_inactive", "epoch": step.epoch,
                         "step": record["step"], "message": message,
                         "residual_contrib_px_mean": record["residual_contrib_px_mean"]})
            self._info("WARNING " + message)

    def state_dict(self) -> dict | None:
        if self.monitor is None:
            return None
        return {"consecutive": self.monitor.consecutive, "fired": self.monitor.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.consecutive = int(state["consecutive"])
            self.monitor.fired = int(state["fired"])
