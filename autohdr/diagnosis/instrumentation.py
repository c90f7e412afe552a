"""Stateful instrumentation attached to the training loop: the runbook's diagnostics.

Each class holds only the state its measurement needs and returns 0-d tensors, so the hooks
read every figure of a step with a single host transfer. The observers of
:mod:`autohdr.diagnosis.observers` (one concern each) are built from these parts.

* :func:`parameter_groups` splits parameters into ``backbone`` / ``param_head`` /
  ``residual_head`` (and ``other`` for anything else), each parameter exactly once, by the
  user's prefixes (``--groups``), the model's ``parameter_groups()`` or autohdr's names.
* :class:`ParamDeltaTracker` measures ``||theta_after - theta_before||`` per group exactly, without
  allocating: one persistent buffer per parameter, updated in place with foreach kernels (one
  subtract and one copy over every group).
* :class:`ResidualInactivityMonitor` counts consecutive steps with a tiny residual.
* :class:`StepTimer` splits a step into named phases, synchronizing CUDA at each mark.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping, Sequence, Union

import torch
import torch.nn as nn

GROUP_NAMES: tuple[str, ...] = ("backbone", "param_head", "residual_head")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


#: A group's members: module-path prefixes (``"net.encoder"``), or the parameters themselves.
GroupMembers = Union[str, Sequence[str], Iterable[nn.Parameter]]

#: autohdr's own model names its submodules after the groups.
DEFAULT_GROUP_PREFIXES: dict[str, tuple[str, ...]] = {name: (name,) for name in GROUP_NAMES}


def parse_group_spec(text: str) -> dict[str, tuple[str, ...]]:
    """``"backbone=net.encoder,param_head=net.head+net.fc"`` -> ``{group: (prefix, ...)}``.

    Groups are separated by ``,``, several prefixes of one group by ``+``. ``ValueError`` names
    the bad part: an unknown group, a missing ``=`` or an empty prefix.
    """
    spec: dict[str, tuple[str, ...]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, prefixes = part.partition("=")
        name = name.strip()
        members = tuple(p.strip() for p in prefixes.split("+"))
        if not sep or not all(members):
            raise ValueError(f"--groups: expected GROUP=PREFIX[+PREFIX...], got {part!r}")
        if name not in GROUP_NAMES:
            raise ValueError(f"--groups: unknown group {name!r}; expected one of {', '.join(GROUP_NAMES)}")
        spec[name] = members
    if not spec:
        raise ValueError(f"--groups: no GROUP=PREFIX given in {text!r}")
    return spec


def _prefix_matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def parameter_groups(model: nn.Module, spec: Mapping[str, GroupMembers] | None = None) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped into ``backbone`` / ``param_head`` / ``residual_head`` (+ ``other``).

    Where the groups come from, first match wins:

    1. ``spec``: group name -> module-path prefix(es) (``"net.encoder"``, matched on whole path
       components) or an iterable of the parameters themselves;
    2. a ``parameter_groups()`` method on the model returning such a mapping;
    3. autohdr's convention: top-level submodules named ``backbone``, ``param_head``, ``residual_head``.

    A parameter matched by several prefixes goes to the longest one. Returns every name of
    :data:`GROUP_NAMES` (an empty list where nothing was named, which the signals report as not
    judged) and ``other`` for the rest. Every parameter appears exactly once (checked).

    Raises:
        ValueError: an unknown group name, or a prefix that matches no parameter (the message lists
            the model's top-level modules).
    """
    model = unwrap_model(model)
    if spec is None and callable(getattr(model, "parameter_groups", None)):
        spec = model.parameter_groups()
    named = list(model.named_parameters())
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    if spec is None:
        spec = DEFAULT_GROUP_PREFIXES
        strict = False  # the convention: a model without such submodules simply has no such group
    else:
        strict = True
    unknown = [g for g in spec if g not in GROUP_NAMES]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; expected {', '.join(GROUP_NAMES)}")
    prefixes: list[tuple[str, str]] = []
    chosen: dict[int, str] = {}
    for group, members in spec.items():
        members = (members,) if isinstance(members, str) else tuple(members)
        for member in members:
            if isinstance(member, str):
                prefixes.append((member, group))
            else:
                chosen[id(member)] = group
    if strict:
        tops = sorted({n.split(".", 1)[0] for n, _ in named})
        for prefix, group in prefixes:
            if not any(_prefix_matches(n, prefix) for n, _ in named):
                raise ValueError(f"parameter group {group}={prefix!r} matches no parameter of "
                                 f"{type(model).__name__}; its top-level modules: {', '.join(tops)}")
    for name, param in named:
        group = chosen.get(id(param))
        if group is None:
            matches = [(len(p), g) for p, g in prefixes if _prefix_matches(name, p)]
            group = max(matches)[1] if matches else "other"
        groups.setdefault(group, []).append(param)
    seen = [id(p) for ps in groups.values() for p in ps]
    total = sum(1 for _ in model.parameters())
    if len(seen) != len(set(seen)) or len(seen) != total:
        raise RuntimeError(f"parameter groups do not cover the {total} parameters exactly once")
    return groups


def group_summary(groups: Mapping[str, list[nn.Parameter]]) -> dict[str, dict[str, int]]:
    """Per group: how many parameter tensors and values, and how many of them are trainable."""
    return {name: {"tensors": len(params), "values": sum(p.numel() for p in params),
                   "trainable_values": sum(p.numel() for p in params if p.requires_grad)}
            for name, params in groups.items()}


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

    Keeps one buffer per parameter (allocated once). ``measure`` subtracts the current values from
    the buffers in place, takes each group's norm, and copies the current values back.
    """

    def __init__(self, groups: Mapping[str, list[nn.Parameter]]) -> None:
        self._groups = {name: list(params) for name, params in groups.items()}
        self._previous = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
        self._all_params = [p for params in self._groups.values() for p in params]
        self._all_previous = [b for buffers in self._previous.values() for b in buffers]
        # an empty group's zero lives where the others' norms do (they are stacked together)
        self._device = self._all_params[0].device if self._all_params else torch.device("cpu")

    @torch.no_grad()
    def measure(self) -> dict[str, torch.Tensor]:
        current = [p.detach() for p in self._all_params]
        if current:
            torch._foreach_sub_(self._all_previous, current)
        deltas = {}
        for name, previous in self._previous.items():
            deltas[name] = (torch.nn.utils.get_total_norm(previous, 2.0) if previous
                            else torch.zeros((), device=self._device))
        if current:
            torch._foreach_copy_(self._all_previous, current)
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
