"""Throughput and timing: where a step's wall time goes, and samples per second over the run.

Not an observer like the others: it *brackets* them. The Instrumentation marks a phase at each hook
(``data`` before the batch start, ``backward`` at on_after_backward, ``optim_step`` at the batch end)
and charges the observers' own work to ``instrumentation``. On CUDA every mark synchronizes (the
phases are real device times, at the cost of a sync per mark): with ``perf`` off and
``instrument`` off nothing is timed.

Writes (``perf``): ``data_time_ms``, ``timing_forward_ms``, ``timing_backward_ms``,
``timing_optim_step_ms``, ``instrumentation_ms``, ``batch_time_ms``, ``samples_per_sec``,
``unaccounted_ms`` and on CUDA ``cuda_mem_*`` per step; the run's summary (``samples_per_sec``
after ``perf_warmup_steps``, ``step_time_ms_mean``, ``<phase>_ms_mean``,
``instrumentation_overhead_frac``) in ``epoch_end`` and ``run_end``. State: none worth resuming
(a resumed process measures its own throughput, warm-up included).
"""

from __future__ import annotations

import time

import torch

from autohdr.diagnosis.instrumentation import StepTimer, cuda_memory_mb
from autohdr.diagnosis.observers.base import Observer


def _now() -> float:
    return time.perf_counter()


class PerfTotals:
    """Run-level throughput: samples over wall time after ``warmup`` steps, warm-up reported apart."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        self.samples = 0
        self.wall_ms = 0.0
        self.warm_samples = 0
        self.warm_wall_ms = 0.0
        self.phases: dict[str, float] = {}

    def add(self, samples: int, wall_ms: float, phases: dict[str, float]) -> None:
        self.steps += 1
        if self.steps <= self.warmup:
            self.warm_samples += samples
            self.warm_wall_ms += wall_ms
            return
        self.samples += samples
        self.wall_ms += wall_ms
        for key, value in phases.items():
            self.phases[key] = self.phases.get(key, 0.0) + value

    def summary(self) -> dict:
        out: dict = {"steps": self.steps, "warmup_steps": min(self.steps, self.warmup),
                     "warmup_wall_ms": self.warm_wall_ms}
        if self.wall_ms > 0:
            measured = self.steps - min(self.steps, self.warmup)
            out["samples_per_sec"] = self.samples / (self.wall_ms / 1000.0)
            out["step_time_ms_mean"] = self.wall_ms / measured
            for key, value in self.phases.items():
                out[f"{key}_ms_mean"] = value / measured
            if "instrumentation" in self.phases:
                out["instrumentation_overhead_frac"] = self.phases["instrumentation"] / self.wall_ms
        return out


class ThroughputObserver(Observer):
    """Phase timings of every step and the run's throughput (see the module docstring)."""

    name = "throughput"

    def __init__(self, device: torch.device, *, perf: bool, timed: bool, warmup_steps: int, world_size: int) -> None:
        self.device = device
        self.perf = perf
        self.world_size = world_size
        self.timer = StepTimer(device, enabled=timed)
        self.totals = PerfTotals(warmup_steps)
        self._step_wall_start: float | None = None

    @property
    def started(self) -> bool:
        """Whether an epoch (or a step) started the clock."""
        return self._step_wall_start is not None

    def restart(self) -> None:
        """A new step's clock starts now (its data wait first)."""
        self.timer.start()
        self._step_wall_start = _now()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to ``phase``."""
        self.timer.mark(phase)

    def step_fields(self, record: dict, step) -> None:
        """The step's wall time (and, with ``perf``, its phases) into the record and the totals."""
        wall_ms = (_now() - (self._step_wall_start or _now())) * 1000.0
        phases = self.timer.phases
        if self.perf:
            record.update(self._perf_fields(phases, wall_ms, int(record["batch_size"])))
        self.totals.add(record["batch_size_global"], wall_ms, phases)

    def summary(self) -> dict:
        return self.totals.summary()

    def _perf_fields(self, phases: dict[str, float], wall_ms: float, batch: int) -> dict:
        fields = {
            "data_time_ms": phases.get("data", 0.0),
            "timing_forward_ms": phases.get("forward", 0.0),
            "timing_backward_ms": phases.get("backward", 0.0),
            "timing_optim_step_ms": phases.get("optim_step", 0.0),
            "instrumentation_ms": phases.get("instrumentation", 0.0),
            "batch_time_ms": wall_ms,
            "samples_per_sec": batch * self.world_size / max(wall_ms / 1000.0, 1e-9),
        }
        fields["unaccounted_ms"] = wall_ms - sum(phases.values())
        fields.update(cuda_memory_mb(self.device))
        return fields
