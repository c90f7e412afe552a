"""Gradient norms: per group before any clipping, the total, and whether the loop clipped.

Writes ``grad_norm_{backbone,param_head,residual_head,other}`` (measured groups only, with
``per_group``), ``grad_norm_total`` (what ``clip_grad_norm_`` returned, else the groups' norm),
``optimizer_grad_norm`` (the norm the optimizer stepped with, where the loop's hooks saw it),
``grad_clipped`` and ``clip_norm`` (given, or observed: the step's norm fell below the total).
State: none.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.instrumentation import grad_norms
from autohdr.diagnosis.observers.base import Observer, StepInfo

#: a step whose gradient norm at the optimizer is this much (relative) below the norm after
#: backward was clipped by the loop (float32 summation order differs by far less)
CLIP_DETECT_RTOL = 1e-3


class GradNormObserver(Observer):
    """Gradient norms read at ``on_after_backward`` (DDP's all-reduce done, clipping not yet)."""

    name = "grad_norms"

    def __init__(self, groups: Mapping[str, list[nn.Parameter]], *, per_group: bool) -> None:
        self.groups = groups
        self.per_group = per_group
        self._norms: dict[str, torch.Tensor] = {}

    def on_after_backward(self, group_grad_norms: Mapping[str, torch.Tensor] | None) -> None:
        self._norms = {}
        if self.per_group:
            measured = group_grad_norms if group_grad_norms is not None else grad_norms(self.groups)
            self._norms = {f"grad_norm_{name}": value.detach().float() for name, value in measured.items()}

    def step_tensors(self, step: StepInfo) -> dict[str, torch.Tensor]:
        tensors = dict(self._norms)
        total = step.grad_norm_total
        if total is None and self._norms:
            total = torch.stack(list(self._norms.values())).square().sum().sqrt()
        if total is not None:
            tensors["grad_norm_total"] = total.detach()
        if step.grad_norm_at_step is not None:
            tensors["optimizer_grad_norm"] = step.grad_norm_at_step.detach()
        return tensors

    def step_fields(self, record: dict, step: StepInfo) -> None:
        clip_norm = step.clip_norm
        if "grad_norm_total" in record:
            record["grad_clipped"] = bool(clip_norm is not None and record["grad_norm_total"] > clip_norm)
            if clip_norm is not None:
                record["clip_norm"] = float(clip_norm)
            if clip_norm is None and "optimizer_grad_norm" in record:
                clipped = record["optimizer_grad_norm"] < record["grad_norm_total"] * (1.0 - CLIP_DETECT_RTOL)
                record["grad_clipped"] = bool(clipped)
                record["clip_norm"] = record["optimizer_grad_norm"] if clipped else None
        self._norms = {}
