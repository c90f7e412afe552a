"""Stateful instrumentation attached to the training loop: the runbook's diagnostics.

Each class holds only the state its measurement needs and returns 0-d tensors, so the trainer
reads every figure of a step with a single host transfer.

* :func:`parameter_groups` splits parameters into ``backbone`` / ``param_head`` /
  ``residual_head`` (and ``other`` for anything else), each parameter exactly once.
* :class:`ParamDeltaTracker` measures ``||theta_after - theta_before||`` per group exactly, without
  allocating: one persistent buffer per parameter, updated in place with foreach kernels.
* :class:`ResidualInactivityMonitor` counts consecutive steps with a tiny residual.
* :class:`StepTimer` splits a step into named phases, synchronizing CUDA at each mark.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

GROUP_NAMES: tuple[str, ...] = ("backbone", "param_head", "residual_head")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped by top-level submodule name.

    Returns the three :data:`GROUP_NAMES` (possibly empty lists) and ``other`` when the model has
    parameters outside them. Every parameter appears exactly once (checked).
    """
    model = unwrap_model(model)
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        groups.setdefault(top if top in GROUP_NAMES else "other", []).append(param)
    seen = [id(p) for ps in groups.values() for p in ps]
    total = sum(1 for _ in model.parameters())
    if len(seen) != len(set(seen)) or len(seen) != total:
        raise RuntimeError(f"parameter groups do not cover the {total} parameters exactly once")
    return groups


def grad_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradients of each group (0 where no parameter has a gradient).

    Call it before clipping: clipped norms top out at the clip value and hide explosions.
    """
    norms = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norms[name] = torch.nn.utils.get_total_norm(grads, 2.0)
        else:
            device = params[0].device if params else torch.device("cpu")
            norms[name] = torch.zeros((), device=device)
    return norms


class ParamDeltaTracker:
    """Exact per-group norm of the change of the parameters between two calls of :meth:`measure`.

    Keeps one buffer per parameter (allocated once). ``measure`` subtracts the current values
    from the buffer in place, takes the norm, and copies the current values back: no per-step
    allocation and no per-tensor host synchronization.
    """

    def __init__(self, groups: dict[str, list[nn.Parameter]]) -> None:
        self._groups = {name: list(params) for name, params in groups.items()}
        self._previous = {name: [p.detach().clone() for p in params] for name, params in groups.items()}

    @torch.no_grad()
    def measure(self) -> dict[str, torch.Tensor]:
        deltas = {}
        for name, params in self._groups.items():
            previous = self._previous[name]
            if not params:
                deltas[name] = torch.zeros(())
                continue
            current = [p.detach() for p in params]
            torch._foreach_sub_(previous, current)
            deltas[name] = torch.nn.utils.get_total_norm(previous, 2.0)
            torch._foreach_copy_(previous, current)
        return deltas


class ResidualInactivityMonitor:
    """Fires when the residual magnitude stays below ``threshold_px`` for ``patience`` steps.

    After firing the count restarts, so a residual that stays dead fires again every
    ``patience`` steps ("repeated inactivity warnings").
    """

    def __init__(self, threshold_px: float, patience: int) -> None:
        self.threshold_px = threshold_px
        self.patience = patience
        self.consecutive = 0
        self.fired = 0

    def update(self, magnitude_px: float) -> bool:
        """Record one step's magnitude; ``True`` when a warning fires on this step."""
        self.consecutive = self.consecutive + 1 if magnitude_px < self.threshold_px else 0
        if self.consecutive >= self.patience:
            self.consecutive = 0
            self.fired += 1
            return True
        return False


class StepTimer:
    """Wall-clock phases of a step in milliseconds; synchronizes CUDA at every mark when asked."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self._sync = enabled and device.type == "cuda"
        self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def start(self) -> None:
        self.phases = {}
        if self._sync:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to ``phase`` (added up if repeated)."""
        if not self.enabled:
            return
        if self._sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - self._last) * 1000.0
        self._last = now


def params_at_bound_fraction(params: torch.Tensor, bounds, tolerance: float = 0.02) -> torch.Tensor:
    """Fraction of the ``(B, 8)`` bounded parameters within ``tolerance`` (of each range) of a bound."""
    lo = params.new_tensor([b[0] for b in bounds])
    hi = params.new_tensor([b[1] for b in bounds])
    margin = (hi - lo) * tolerance
    at_bound = (params <= lo + margin) | (params >= hi - margin)
    return at_bound.float().mean()


def cuda_memory_mb(device: torch.device) -> dict[str, float]:
    """Allocator figures in MiB on CUDA, empty elsewhere."""
    if device.type != "cuda":
        return {}
    mib = 1024.0 ** 2
    return {
        "cuda_mem_allocated_mb": torch.cuda.memory_allocated(device) / mib,
        "cuda_mem_reserved_mb": torch.cuda.memory_reserved(device) / mib,
        "max_cuda_mem_allocated_mb": torch.cuda.max_memory_allocated(device) / mib,
    }
