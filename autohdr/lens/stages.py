"""Training stages: which parts of the lens model a stage trains and which loss terms count.

A stage is a property of the model (does the residual flow take part?), so it lives beside it;
:mod:`autohdr.training.config` re-exports it for configs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """What a training stage switches on."""

    name: str
    residual_active: bool   # the residual flow is fused into the grid and its head is trained
    residual_terms: bool    # flow_tv / flow_mag / flow_curv regularizers count
    jacobian_term: bool     # the fold penalty counts
    lr_scale: float         # multiplies TrainConfig.lr


STAGES: dict[str, StageSpec] = {
    "stage1_param_only": StageSpec("stage1_param_only", False, False, False, 1.0),
    "stage2_hybrid": StageSpec("stage2_hybrid", True, True, True, 1.0),
    "stage3_finetune": StageSpec("stage3_finetune", True, True, True, 0.2),
}


def stage_spec(name: str) -> StageSpec:
    """The :class:`StageSpec` called ``name``; ``ValueError`` lists the valid names."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}") from None
