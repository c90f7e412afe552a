"""Geometry: how far the predicted warp moves pixels, and how much of it is the residual.

Writes, from the step's :class:`~autohdr.lens.evaluation.Correction`,
``param_grid_disp_px_{mean,max,std}``, ``final_grid_disp_px_*``, ``residual_contrib_px_*``,
``residual_to_param_disp_ratio_mean``, ``grid_out_of_bounds_frac``, ``grid_folded_frac``
(:func:`~autohdr.lens.geometry.grid_statistics`), ``params_at_bound_frac`` and, with a residual,
``residual_flow_abs_mean_px``. The probe's geometry figures use the same function. State: none.
"""

from __future__ import annotations

import torch

from autohdr.diagnosis.instrumentation import params_at_bound_fraction
from autohdr.diagnosis.observers.base import Observer, StepInfo
from autohdr.lens.evaluation import Correction
from autohdr.lens.geometry import grid_statistics


def geometry_figures(correction: Correction, param_bounds) -> dict[str, torch.Tensor]:
    """The geometry figures of ``correction`` as 0-d tensors (see the module docstring)."""
    with torch.no_grad():
        warp = correction.warp
        fused = warp.final_grid is not warp.param_grid  # fuse_grid returns the parametric grid alone
        stats = grid_statistics(warp.param_grid.detach().float(),
                                warp.final_grid.detach().float() if fused else None)
        stats["params_at_bound_frac"] = params_at_bound_fraction(correction.params.detach().float(), param_bounds)
        if correction.residual_flow_lowres is not None:
            stats["residual_flow_abs_mean_px"] = correction.residual_flow_lowres.detach().abs().mean()
    return stats


class GeometryObserver(Observer):
    """The step's warp statistics (the step must pass its ``correction``)."""

    name = "geometry"

    def __init__(self, param_bounds) -> None:
        self.param_bounds = param_bounds

    def step_tensors(self, step: StepInfo) -> dict[str, torch.Tensor]:
        return geometry_figures(step.correction, self.param_bounds) if step.correction is not None else {}
