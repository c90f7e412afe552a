"""Tests of autohdr.diagnosis.verdicts: every signal judged on hand-made metric histories.

``healthy_records`` builds the records a good run writes to ``metrics.jsonl`` (same kinds and
field names as ``autohdr.training.trainer``); each fault below is a small function that edits those records
the way one known failure would. For every signal there is a green test (healthy run), a red test
(its fault, with the detail that explains it), a not-applicable test, and for every fault the exact
set of signals that go bad, so that a fault neither goes unnoticed nor raises false alarms.

Reference values of the healthy run (4 epochs x 5 steps): loss ``1 - 0.5 * step / 20``; clipped on
steps 10 and 20 (10 %); data 2 ms of a 40 ms step (5 %); val proxy ``0.45 + 0.01 * epoch`` against
identity 0.40 and ground truth 0.60, so the last epoch (0.48) closes (0.48 - 0.40) / (0.60 - 0.40)
= 40 % of the gap; the model's own mean lens on every image scores 0.42 (with instrumentation on),
and the predictions correlate 0.9 (k1) and 0.8 (s) with ground truth.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import pandas as pd
import pytest

from autohdr.diagnosis.metrics_log import MetricsWriter
from autohdr.diagnosis.verdicts import SIGNALS, JudgeConfig, Verdict, all_good, format_table, judge

Record = dict[str, Any]

STAGES = ("stage1_param_only", "stage2_hybrid", "stage3_finetune")
RESIDUAL_ACTIVE = {"stage1_param_only": False, "stage2_hybrid": True, "stage3_finetune": True}
RESIDUAL_SIGNALS = {"residual_contributes", "residual_head_learning", "residual_not_inactive"}
#: Also off (n/a) when the residual branch is off, and with instrumentation off.
RESIDUAL_EFFECT_SIGNALS = {"residual_helps", "eval_residual_matches_train", "eval_flow_matches_train"}
RESIDUAL_OFF_NA = RESIDUAL_SIGNALS | RESIDUAL_EFFECT_SIGNALS
#: Signals that read only what debug_instrumentation adds.
INSTRUMENTED_ONLY = {"probe_checksums_change", "probe_tracks_updates", "param_head_not_saturated",
                     "param_head_learning", "backbone_learning", "optimizer_covers_params", "eval_deterministic",
                     "batches_in_range", "batches_vary", "beats_constant_lens", "groups_move_with_gradients",
                     "train_val_agree", "params_track_ground_truth", "val_batches_repeat"}
GROUPS = ("backbone", "param_head", "residual_head")
IDENTITY_PROXY, GT_PROXY = 0.40, 0.60
CONSTANT_LENS_PROXY = 0.42


# ---------------------------------------------------------------------------- the builder

def healthy_records(stage: str = "stage2_hybrid", *, epochs: int = 4, steps_per_epoch: int = 5,
                    world_size: int = 1, instrumentation: bool = True, perf: bool = True,
                    ground_truth: bool = True) -> list[Record]:
    """The records of a run that does everything right.

    ``instrumentation=False`` drops what ``debug_instrumentation`` adds (per-group gradients,
    parameter deltas, residual and saturation statistics, probe fields, rank checksums);
    ``perf=False`` drops what ``debug_perf_enabled`` adds (timings, per-step throughput).
    In stage 1 the residual head is frozen and off: zero gradient, delta and contribution.
    """
    residual = RESIDUAL_ACTIVE[stage]
    records: list[Record] = [
        {"kind": "run_start", "stage": stage, "residual_branch_active": residual, "world_size": world_size},
        {"kind": "init", "init_pred_max_abs_diff": 0.0, "init_proxy_total": IDENTITY_PROXY,
         "identity_proxy_total": IDENTITY_PROXY, "init_loss": 1.0, "identity_loss": 1.0, "from_checkpoint": False,
         "init_params_max_abs_dev": 0.0, "init_image_height": 128, "init_image_width": 128},
    ]
    total_steps = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            loss = 1.0 - 0.5 * step / total_steps
            rec: Record = {"kind": "train_step", "epoch": epoch, "step": step, "lr": 1e-3,
                           "loss": loss, "grad_norm_total": 0.5,
                           "grad_clipped": step % 10 == 0, "residual_branch_active": residual,
                           # two param groups, the heads' lr 3x the backbone's (as in the competition loop)
                           "lr_groups": [1e-3, 3e-3], "loss_parts": ["flow_tv", "pixel"],
                           "pixel": loss, "pixel_weighted": loss,
                           "flow_tv": 0.04 if residual else 0.0, "flow_tv_weighted": 0.002 if residual else 0.0}
            if epoch > 0 and step == epoch * steps_per_epoch + 1:
                rec["weights_jump_before_epoch"] = 0.0  # nothing touches the weights between epochs
            if instrumentation:
                rec.update({"grad_norm_backbone": 0.3, "grad_norm_param_head": 0.2,
                            "grad_norm_residual_head": 0.1 if residual else 0.0,
                            "param_delta_backbone": 1e-3, "param_delta_param_head": 5e-4,
                            "param_delta_residual_head": 2e-4 if residual else 0.0,
                            "residual_contrib_px_mean": 0.05 if residual else 0.0,
                            "residual_to_param_disp_ratio_mean": 0.5 if residual else 0.0,
                            "params_at_bound_frac": 0.05, "batch_min": 0.0, "batch_max": 1.0,
                            "batch_nonfinite": 0.0, "batch_fingerprint": f"batch{step:011d}"})
                if residual:
                    rec["residual_flow_abs_mean_px"] = 0.04
            if perf:
                rec.update({"data_time_ms": 2.0, "batch_time_ms": 40.0, "samples_per_sec": 200.0})
            records.append(rec)
        epoch_loss = sum(1.0 - 0.5 * s / total_steps for s in range(step - steps_per_epoch + 1, step + 1)) / steps_per_epoch
        val: Record = {"kind": "val_epoch", "epoch": epoch, "step": step, "val_proxy_total": 0.45 + 0.01 * epoch,
                       "identity_proxy_total": IDENTITY_PROXY, "val_sample_count": 16,
                       "val_loss": epoch_loss * 0.97}
        if ground_truth:
            val["gt_proxy_total"] = GT_PROXY
        if instrumentation:
            val["constant_lens_proxy_total"] = CONSTANT_LENS_PROXY
            if ground_truth:
                val.update({"pred_gt_corr_k1": 0.9, "pred_gt_corr_s": 0.8})
            val.update({"probe_pred_checksum": f"pred{epoch:012d}", "probe_final_grid_checksum": f"grid{epoch:012d}",
                        "probe_params_checksum": f"parm{epoch:012d}", "probe_proxy_total_score": 0.50 + 0.01 * epoch,
                        "probe_pixel": 0.20 - 0.01 * epoch, "probe_repeat_max_abs_diff": 0.0,
                        "probe_residual_contrib_px_mean": 0.04 if residual else 0.0,
                        "val_batch_fingerprint": "valbatch00000000", "val_ids_match_train": True,
                        "train_epoch_loss_mean": epoch_loss, "train_epoch_steps": steps_per_epoch})
            if residual:
                val["probe_flow_cosine_train_eval"] = 1.0
            if residual:
                val["val_proxy_no_residual_total"] = 0.445 + 0.01 * epoch
            if world_size > 1:
                val["rank_param_checksums"] = [f"p{epoch}"] * world_size
                val["rank_probe_checksums"] = [f"q{epoch}"] * world_size
        records.append(val)
        records.append({"kind": "loop_validation", "epoch": epoch, "step": step, "loop_val_forwards": 2,
                        "loop_val_train_mode_forwards": 0})
    end: Record = {"kind": "run_end", "epoch": epochs - 1, "step": step, "samples_per_sec": 200.0}
    if instrumentation:
        end["optimizer_coverage"] = {"steps_observed": step, "optimized_tensors": 40,
                                     "grad_not_optimized": [], "optimized_never_grad": []}
    records.append(end)
    return records


def frame(records: list[Record]) -> pd.DataFrame:
    """The history exactly as ``read_metrics`` builds it."""
    return pd.DataFrame.from_records(records)


def history(stage: str = "stage2_hybrid", *faults: Callable[[list[Record]], list[Record]], **options) -> pd.DataFrame:
    records = healthy_records(stage, **options)
    for fault in faults:
        records = fault(records)
    return frame(records)


def verdicts(hist: pd.DataFrame, cfg: JudgeConfig | None = None) -> dict[str, Verdict]:
    return {v.signal: v for v in judge(hist, cfg)}


def bad(hist: pd.DataFrame, cfg: JudgeConfig | None = None) -> set[str]:
    return {v.signal for v in judge(hist, cfg) if v.ok is False}


def judged(signal: str, hist: pd.DataFrame, cfg: JudgeConfig | None = None) -> Verdict:
    return SIGNALS[signal](hist, cfg or JudgeConfig())


# ---------------------------------------------------------------------------- mutators

def _edit(records: list[Record], kind: str, when: Callable[[Record], bool] = lambda r: True,
          **fields: Any) -> list[Record]:
    """Copy of ``records`` with ``fields`` set (a callable value gets the record) on matching records."""
    out = copy.deepcopy(records)
    for rec in out:
        if rec["kind"] == kind and when(rec):
            rec.update({k: v(rec) if callable(v) else v for k, v in fields.items()})
    return out


def _drop(records: list[Record], kind: str, *names: str) -> list[Record]:
    out = copy.deepcopy(records)
    for rec in out:
        if rec["kind"] == kind:
            for name in names:
                rec.pop(name, None)
    return out


def _before_run_end(records: list[Record], *extra: Record) -> list[Record]:
    out = copy.deepcopy(records)
    return out[:-1] + list(extra) + out[-1:]


def with_warnings(count: int) -> Callable[[list[Record]], list[Record]]:
    def add(records: list[Record]) -> list[Record]:
        return _before_run_end(records, *({"kind": "warning", "name": "residual_inactive", "epoch": 1,
                                           "step": 6 + i, "message": f"residual branch inactive (warning #{i + 1})",
                                           "residual_contrib_px_mean": 0.0} for i in range(count)))
    return add


# ---------------------------------------------------------------------------- faults

def stale_probe(records):
    """Evaluation scores a stale copy of the model: the probe is identical every epoch."""
    return _edit(records, "val_epoch", probe_pred_checksum="stale00000000000",
                 probe_final_grid_checksum="stalegrid0000000", probe_params_checksum="staleparm0000000",
                 probe_proxy_total_score=0.50, probe_pixel=0.20)


def residual_frozen(records):
    """The residual head is detached or frozen: no gradient, no update, no contribution, warnings."""
    records = _edit(records, "train_step", grad_norm_residual_head=0.0, param_delta_residual_head=0.0,
                    residual_contrib_px_mean=0.0, residual_flow_abs_mean_px=0.0)
    records = _edit(records, "val_epoch", probe_residual_contrib_px_mean=0.0)
    return with_warnings(3)(records)


def lr_zero(records):
    """Learning rate 0: nothing moves, the loss is flat, scores and checksums stay at epoch 0's."""
    records = _edit(records, "train_step", lr=0.0, lr_groups=[0.0, 0.0], loss=0.8,
                    **{f"param_delta_{g}": 0.0 for g in GROUPS})
    records = _edit(records, "val_epoch", lambda v: "val_proxy_no_residual_total" in v,
                    val_proxy_no_residual_total=0.445)
    return _edit(records, "val_epoch", val_proxy_total=0.45, probe_proxy_total_score=0.50, probe_pixel=0.20,
                 probe_pred_checksum="pred000000000000", probe_final_grid_checksum="grid000000000000",
                 probe_params_checksum="parm000000000000")


def data_bound(records):
    """The loader starves the model: 30 of 40 ms per step wait for data."""
    return _edit(records, "train_step", data_time_ms=30.0)


NON_FINITE_MESSAGE = ("non-finite loss (nan) at epoch 4, step 21; non-finite components: ['pixel']. "
                      "Lower the learning rate (lr=0.001) or check the inputs.")


def non_finite_error(records):
    """The trainer stopped on a NaN loss (components are written as strings, like MetricsWriter does)."""
    return _before_run_end(records, {"kind": "error", "name": "non_finite", "epoch": 3, "step": 21,
                                     "message": NON_FINITE_MESSAGE, "pixel": "nan", "ssim": 0.1})


def non_finite_grad(records):
    """One step recorded an infinite gradient norm."""
    return _edit(records, "train_step", lambda r: r["step"] == 7, grad_norm_total=float("inf"))


def identity_wins(records):
    """The model improves but never gets past the identity warp (0.36 .. 0.39 < 0.40)."""
    records = _edit(records, "val_epoch", val_proxy_total=lambda r: 0.36 + 0.01 * r["epoch"])
    return _edit(records, "val_epoch", lambda v: "val_proxy_no_residual_total" in v,
                 val_proxy_no_residual_total=lambda v: v["val_proxy_total"] - 0.005)


def one_lens_for_all(records):
    """The model ignores its input: its own mean lens on every image scores what it scores, and
    its predictions do not follow the ground truth; it still beats identity."""
    return _edit(records, "val_epoch", constant_lens_proxy_total=lambda r: r["val_proxy_total"] - 0.001,
                 pred_gt_corr_k1=0.02, pred_gt_corr_s=None)


def init_not_identity(records):
    """The untrained model already warps: prediction and proxy differ from identity's."""
    return _edit(records, "init", init_pred_max_abs_diff=0.01, init_proxy_total=0.38)


def loss_flat(records):
    """Parameters move and scores change, but the training loss does not go down."""
    return _edit(records, "train_step", loss=0.8)


def always_clipped(records):
    return _edit(records, "train_step", grad_clipped=True)


def saturated(records):
    """90 % of the predicted lens parameters sit at their bounds."""
    return _edit(records, "train_step", params_at_bound_frac=0.9)


def param_head_detached(records):
    return _edit(records, "train_step", grad_norm_param_head=0.0, param_delta_param_head=0.0)


def ranks_diverged(records):
    """Two ranks, in sync for epochs 0 and 1, with different parameters from epoch 2 on."""
    records = _edit(records, "run_start", world_size=2)
    records = _edit(records, "val_epoch", rank_param_checksums=lambda r: [f"p{r['epoch']}"] * 2,
                    rank_probe_checksums=lambda r: [f"q{r['epoch']}"] * 2)
    return _edit(records, "val_epoch", lambda r: r["epoch"] >= 2,
                 rank_param_checksums=lambda r: [f"p{r['epoch']}", f"p{r['epoch']}-other"])


def backbone_starved(records):
    """The heads are fed detached features: the backbone never gets a gradient nor moves."""
    return _edit(records, "train_step", grad_norm_backbone=0.0, param_delta_backbone=0.0)


def outside_optimizer(records):
    """A gain parameter created after the optimizer: it gets gradients and is never updated."""
    return _edit(records, "run_end", optimizer_coverage=lambda r: {**r["optimizer_coverage"],
                                                                   "grad_not_optimized": ["late_gain"]})


def eval_random(records):
    """Dropout on in eval mode: the same probe evaluated twice differs."""
    return _edit(records, "val_epoch", probe_repeat_max_abs_diff=0.03)


def residual_off_at_eval(records):
    """The residual branch is on in training but off at evaluation."""
    return _edit(records, "val_epoch", probe_residual_contrib_px_mean=0.0)


def residual_wrong_units(records):
    """The residual moves but is 0.08 % of the parametric displacement (a residual x 0.01, measured):
    wrong units."""
    return _edit(records, "train_step", residual_to_param_disp_ratio_mean=lambda r: 0.0008 if r[
        "residual_branch_active"] else 0.0)


def residual_hurts(records):
    """Validation is better with the residual zeroed than with it."""
    return _edit(records, "val_epoch", lambda v: "val_proxy_no_residual_total" in v,
                 val_proxy_no_residual_total=lambda v: v["val_proxy_total"] + 0.02)


def batch_0_255(records):
    """Inputs in 0..255 from step 3 on, one sample named."""
    return _edit(records, "train_step", lambda r: r["step"] >= 3, batch_max=255.0,
                 batch_bad_sample={"index": 1, "image_id": "p007", "nonfinite": False, "min": 0.0, "max": 255.0})


def batch_repeated(records):
    """The loader serves one cached batch for every step."""
    return _edit(records, "train_step", batch_fingerprint="same00000000000")


def pairs_swapped(records):
    """Inputs and targets swapped: the ground-truth warp makes things worse than identity."""
    return _edit(records, "val_epoch", gt_proxy_total=0.35)


def group_lr_zero(records):
    """The backbone's param group at lr 0: gradients, no update."""
    return _edit(records, "train_step", param_delta_backbone=0.0)


def norm_before_backward(records):
    """The logged total norm was taken before backward: 0 while the groups have gradients."""
    return _edit(records, "train_step", grad_norm_total=0.0)


def loss_summed(records):
    """The training loss summed over 128 x 128 pixels: 16384x the loss identity gets at init."""
    records = _edit(records, "train_step", loss=lambda r: r["loss"] * 16384)
    return _edit(records, "val_epoch", train_epoch_loss_mean=lambda r: r["train_epoch_loss_mean"] * 16384)


def eval_other_weights(records):
    """Validation runs other weights: the same samples score 1.6x worse than in training."""
    return _edit(records, "val_epoch", val_loss=lambda r: r["train_epoch_loss_mean"] * 1.6)


def wrong_lens(records):
    """The model learns the wrong lens: k1 correlates -0.5 with the ground truth."""
    return _edit(records, "val_epoch", pred_gt_corr_k1=-0.5)


def residual_flipped_at_eval(records):
    """The residual flow is negated in eval mode: the same magnitude, the opposite direction."""
    return _edit(records, "val_epoch", lambda v: "probe_flow_cosine_train_eval" in v, probe_flow_cosine_train_eval=-1.0)


def val_augmented(records):
    """Random augmentation in the validation loader: each validation scores other pixels."""
    return _edit(records, "val_epoch", val_batch_fingerprint=lambda r: f"valbatch{r['epoch']:08d}")


def lr_schedule_ends(records):
    """A schedule sized to the first epoch with a floor of 0: lr 0 from step 6 on, so nothing moves
    and the probe stays at epoch 0's."""
    records = _edit(records, "train_step", lambda r: r["step"] > 5, lr=0.0, lr_groups=[0.0, 0.0],
                    **{f"param_delta_{g}": 0.0 for g in GROUPS})
    return _edit(records, "val_epoch", probe_pred_checksum="pred000000000000")


def group_lr_negligible(records):
    """The heads' param group left at lr 0 under a schedule with an absolute floor: 1e-6 next to 1e-3."""
    return _edit(records, "train_step", lr_groups=[1e-3, 1e-6])


def regularizers_swamp_loss(records):
    """Regularizer weights x1000: the flow terms are 60 % of the total loss."""
    return _edit(records, "train_step", flow_tv=0.04, flow_tv_weighted=lambda r: 0.6 * r["loss"])


def validate_in_train_mode(records):
    """The loop's own validate() without model.eval(): both of its forwards in train mode."""
    return _edit(records, "loop_validation", loop_val_train_mode_forwards=2)


def weights_reloaded(records):
    """Each epoch from the second starts from other weights than the last one ended with."""
    return _edit(records, "train_step", lambda r: "weights_jump_before_epoch" in r, weights_jump_before_epoch=0.5)


# Fault -> signals that must go bad, in every stage unless listed per stage.
EXPECTED_BAD: dict[Callable, dict[str, set[str]]] = {
    stale_probe: dict.fromkeys(STAGES, {"probe_tracks_updates", "probe_checksums_change", "scores_move"}),
    residual_frozen: {"stage1_param_only": set(),  # the branch is off in stage 1: not judged
                      "stage2_hybrid": RESIDUAL_SIGNALS, "stage3_finetune": RESIDUAL_SIGNALS},
    # Nothing moves, so the probe is not stale (it tracks the absent updates). With the residual
    # branch on, its head's update is zero on every step as well.
    # and every group has gradients without moving, at an lr of 0 on every step
    lr_zero: {"stage1_param_only": {"scores_move", "probe_checksums_change", "loss_decreases",
                                    "groups_move_with_gradients", "lr_not_mostly_zero"},
              "stage2_hybrid": {"scores_move", "probe_checksums_change", "loss_decreases", "residual_head_learning",
                                "groups_move_with_gradients", "lr_not_mostly_zero"},
              "stage3_finetune": {"scores_move", "probe_checksums_change", "loss_decreases", "residual_head_learning",
                                  "groups_move_with_gradients", "lr_not_mostly_zero"}},
    data_bound: dict.fromkeys(STAGES, {"not_data_bound"}),
    non_finite_error: dict.fromkeys(STAGES, {"finite"}),
    non_finite_grad: dict.fromkeys(STAGES, {"finite"}),
    # losing to identity (0.39) also loses to the model's mean lens (0.42), which beats identity
    identity_wins: dict.fromkeys(STAGES, {"beats_identity", "beats_constant_lens"}),
    one_lens_for_all: dict.fromkeys(STAGES, {"beats_constant_lens"}),
    init_not_identity: dict.fromkeys(STAGES, {"init_is_identity"}),
    loss_flat: dict.fromkeys(STAGES, {"loss_decreases"}),
    always_clipped: dict.fromkeys(STAGES, {"clipping_sane"}),
    saturated: dict.fromkeys(STAGES, {"param_head_not_saturated"}),
    param_head_detached: dict.fromkeys(STAGES, {"param_head_learning"}),
    ranks_diverged: dict.fromkeys(STAGES, {"ranks_in_sync"}),
    backbone_starved: dict.fromkeys(STAGES, {"backbone_learning"}),
    outside_optimizer: dict.fromkeys(STAGES, {"optimizer_covers_params"}),
    eval_random: dict.fromkeys(STAGES, {"eval_deterministic"}),
    residual_off_at_eval: {"stage1_param_only": set(), "stage2_hybrid": {"eval_residual_matches_train"},
                           "stage3_finetune": {"eval_residual_matches_train"}},
    residual_wrong_units: {"stage1_param_only": set(), "stage2_hybrid": {"residual_contributes"},
                           "stage3_finetune": {"residual_contributes"}},
    residual_hurts: {"stage1_param_only": set(), "stage2_hybrid": {"residual_helps"},
                     "stage3_finetune": {"residual_helps"}},
    batch_0_255: dict.fromkeys(STAGES, {"batches_in_range"}),
    batch_repeated: dict.fromkeys(STAGES, {"batches_vary"}),
    pairs_swapped: dict.fromkeys(STAGES, {"pairs_match_ground_truth"}),
    group_lr_zero: dict.fromkeys(STAGES, {"groups_move_with_gradients"}),
    norm_before_backward: dict.fromkeys(STAGES, {"logged_quantities_agree"}),
    # the validation loss (averaged) is 1/16384 of the training loss of the same samples
    loss_summed: dict.fromkeys(STAGES, {"logged_quantities_agree", "train_val_agree"}),
    eval_other_weights: dict.fromkeys(STAGES, {"train_val_agree"}),
    wrong_lens: dict.fromkeys(STAGES, {"params_track_ground_truth"}),
    residual_flipped_at_eval: {"stage1_param_only": set(), "stage2_hybrid": {"eval_flow_matches_train"},
                               "stage3_finetune": {"eval_flow_matches_train"}},
    val_augmented: dict.fromkeys(STAGES, {"val_batches_repeat"}),
    # nothing moves from epoch 2 on (the probe stays at epoch 1's; the healthy loss curve is kept)
    group_lr_negligible: dict.fromkeys(STAGES, {"group_lr_not_negligible"}),
    regularizers_swamp_loss: dict.fromkeys(STAGES, {"loss_not_regularizer_bound"}),
    validate_in_train_mode: dict.fromkeys(STAGES, {"loop_validation_in_eval_mode"}),
    weights_reloaded: dict.fromkeys(STAGES, {"weights_continue_across_epochs"}),
    lr_schedule_ends: {"stage1_param_only": {"lr_not_mostly_zero", "groups_move_with_gradients",
                                             "probe_checksums_change"},
                       **dict.fromkeys(("stage2_hybrid", "stage3_finetune"), {
                           "lr_not_mostly_zero", "groups_move_with_gradients", "probe_checksums_change",
                           "residual_head_learning"})},
}

# Signal -> (fault that turns it red, stage, words its detail must contain).
RED: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    "scores_move": (stale_probe, "stage1_param_only",
                    ("unchanged across 4 epochs", "probe_proxy_total_score", "probe_pixel")),
    "probe_checksums_change": (stale_probe, "stage2_hybrid", ("probe prediction checksum identical in all 4 epochs",)),
    "probe_tracks_updates": (stale_probe, "stage3_finetune",
                             ("probe unchanged while parameters moved", "[1, 2, 3]", "stale model")),
    "residual_contributes": (residual_frozen, "stage2_hybrid", ("residual contribution stays at 0.00e+00 px",)),
    "residual_head_learning": (residual_frozen, "stage3_finetune",
                               ("gradient zero on 100%", "update zero on 100% of steps")),
    "residual_not_inactive": (residual_frozen, "stage2_hybrid", ("3 residual inactivity warnings",)),
    "beats_identity": (identity_wins, "stage2_hybrid",
                       ("identity wins or ties", "model 0.3900 vs identity 0.4000", "needs +0.002")),
    "beats_constant_lens": (one_lens_for_all, "stage1_param_only",
                            ("model 0.4800 vs its own mean lens on every image 0.4790 (+0.0010)",
                             "k1 correlates +0.02 with ground truth", "needs +0.01", "one lens for all images")),
    "not_data_bound": (data_bound, "stage1_param_only", ("data loading takes 75% of each step", "200.0 samples/s")),
    "init_is_identity": (init_not_identity, "stage2_hybrid",
                         ("not the identity warp", "prediction differs by 1.00e-02", "proxy differs by 2.00e-02")),
    "loss_decreases": (loss_flat, "stage1_param_only", ("training loss fell only 0.0%", "needs 5%")),
    "finite": (non_finite_error, "stage2_hybrid", (NON_FINITE_MESSAGE,)),
    "clipping_sane": (always_clipped, "stage2_hybrid", ("gradients clipped on 100% of steps", "clip norm too tight")),
    "param_head_not_saturated": (saturated, "stage1_param_only", ("90% of predicted parameters sit at their bounds",)),
    "param_head_learning": (param_head_detached, "stage2_hybrid",
                            ("parameter head gradient is zero on 100% of steps", "detached")),
    "ranks_in_sync": (ranks_diverged, "stage2_hybrid",
                      ("ranks diverged at epoch 2", "rank_param_checksums differ across ranks")),
    "backbone_learning": (backbone_starved, "stage1_param_only", ("backbone gradient is zero on 100% of steps",
                                                                 "detached")),
    "optimizer_covers_params": (outside_optimizer, "stage2_hybrid",
                                ("1 parameter(s) get gradients but are not in the optimizer", "late_gain")),
    "eval_deterministic": (eval_random, "stage2_hybrid", ("evaluated twice differs by 0.03", "dropout")),
    "eval_residual_matches_train": (residual_off_at_eval, "stage3_finetune",
                                    ("0.05 px in training but 0 px at evaluation",)),
    "residual_helps": (residual_hurts, "stage2_hybrid", ("the residual makes the score worse", "(-0.0200)")),
    "batches_in_range": (batch_0_255, "stage1_param_only",
                         ("18 training batch(es) out of range", "first at step 3, sample p007", "expected [0, 1]")),
    "batches_vary": (batch_repeated, "stage2_hybrid", ("the same batch as the step before on 100% of steps",)),
    "pairs_match_ground_truth": (pairs_swapped, "stage2_hybrid", ("below identity's 0.4000", "swapped")),
    "groups_move_with_gradients": (group_lr_zero, "stage1_param_only",
                                   ("backbone gets a gradient but does not move on 100% of those steps",)),
    "logged_quantities_agree": (norm_before_backward, "stage2_hybrid",
                                ("grad_norm_total 0 is below the groups' combined norm 0.3742", "on 20 of 20 steps")),
    "train_val_agree": (eval_other_weights, "stage1_param_only", ("(1.60x)", "a different model")),
    "params_track_ground_truth": (wrong_lens, "stage1_param_only", ("k1 correlates -0.50", "wrong lens")),
    "eval_flow_matches_train": (residual_flipped_at_eval, "stage2_hybrid", ("cosine -1.00",)),
    "val_batches_repeat": (val_augmented, "stage3_finetune", ("4 versions in 4", "augmentation")),
    "lr_not_mostly_zero": (lr_schedule_ends, "stage1_param_only", ("(near) 0 on 75% of 20 steps", "peak 0.003")),
    "group_lr_not_negligible": (group_lr_negligible, "stage2_hybrid",
                                ("param group 1 lr 1e-06 at step 1", "below 0.01x", "on 100% of steps")),
    "loss_not_regularizer_bound": (regularizers_swamp_loss, "stage2_hybrid",
                                   ("the regularizers (flow_tv) are 60% of the total loss", "allowed 5%")),
    "loop_validation_in_eval_mode": (validate_in_train_mode, "stage3_finetune",
                                     ("ran 8 of 8 forwards in train mode", "4 of 4 validations")),
    "weights_continue_across_epochs": (weights_reloaded, "stage1_param_only",
                                       ("changed by 0.5", "at the start of epoch(s) [1, 2, 3]")),
}


def test_every_signal_is_covered():
    assert set(RED) == set(SIGNALS)
    assert {s for per_stage in EXPECTED_BAD.values() for bads in per_stage.values() for s in bads} == set(SIGNALS)


# ---------------------------------------------------------------------------- green

class TestHealthyRun:
    @pytest.mark.parametrize("stage", STAGES)
    @pytest.mark.parametrize("signal", list(SIGNALS))
    def test_each_signal_is_good(self, signal, stage):
        verdict = judged(signal, history(stage, world_size=2))
        expected = None if (signal in RESIDUAL_OFF_NA and not RESIDUAL_ACTIVE[stage]) else True
        assert verdict.signal == signal
        assert verdict.ok is expected, verdict.detail

    @pytest.mark.parametrize("stage", STAGES)
    def test_single_process_run_is_all_good(self, stage):
        result = verdicts(history(stage))
        not_applicable = {s for s, v in result.items() if v.ok is None}
        assert not_applicable == {"ranks_in_sync"} | (set() if RESIDUAL_ACTIVE[stage] else RESIDUAL_OFF_NA)
        assert {s for s, v in result.items() if v.ok is True} == set(SIGNALS) - not_applicable
        assert all_good(list(result.values()))

    def test_good_details_and_evidence(self):
        result = verdicts(history("stage2_hybrid", world_size=2))
        assert result["scores_move"].detail == "scores change across 4 epochs"
        assert result["scores_move"].evidence["val_proxy_total_distinct"] == 4
        assert result["probe_checksums_change"].detail == "4 distinct prediction checksums in 4 epochs"
        assert result["probe_tracks_updates"].evidence == {"stale_epochs": [], "epochs_compared": 3}
        assert result["residual_contributes"].evidence["late_median_px"] == pytest.approx(0.05)
        assert result["residual_contributes"].evidence["residual_flow_abs_mean_px_max"] == pytest.approx(0.04)
        assert result["residual_not_inactive"].evidence == {"inactivity_warnings": 0, "allowed": 1}
        assert result["not_data_bound"].evidence["data_time_frac_median"] == pytest.approx(0.05)
        # first and last complete epoch: steps 1-5 mean 1 - 0.5 * 3 / 20, steps 16-20 mean 1 - 0.5 * 18 / 20
        loss = result["loss_decreases"].evidence
        assert (loss["basis"], loss["window"], loss["first_window_mean"], loss["last_window_mean"]) == \
            ("epochs", [0, 3], pytest.approx(0.925), pytest.approx(0.55))
        assert result["clipping_sane"].evidence["clipped_frac"] == pytest.approx(0.1)
        assert result["finite"].detail == "all 20 steps finite"
        assert result["ranks_in_sync"].detail == "parameter and probe checksums agree across ranks in 4 epochs"


# ---------------------------------------------------------------------------- red

class TestFaults:
    @pytest.mark.parametrize("signal", list(RED))
    def test_fault_turns_its_signal_red(self, signal):
        fault, stage, words = RED[signal]
        verdict = judged(signal, history(stage, fault))
        assert verdict.ok is False
        for word in words:
            assert word in verdict.detail

    @pytest.mark.parametrize("stage", STAGES)
    @pytest.mark.parametrize("fault", list(EXPECTED_BAD), ids=lambda f: f.__name__)
    def test_exactly_the_expected_signals_go_bad(self, fault, stage):
        assert bad(history(stage, fault)) == EXPECTED_BAD[fault][stage]

    def test_lr_zero_is_not_a_stale_probe(self):
        result = verdicts(history("stage1_param_only", lr_zero))
        assert result["probe_tracks_updates"].ok is True
        assert result["probe_tracks_updates"].evidence["stale_epochs"] == []
        assert "val_proxy_total, probe_proxy_total_score, probe_pixel" in result["scores_move"].detail

    def test_one_stale_epoch_is_located(self):
        # Epoch 2 repeats epoch 1's probe checksum although the parameters moved in between.
        hist = history("stage2_hybrid", lambda r: _edit(r, "val_epoch", lambda v: v["epoch"] == 2,
                                                        probe_pred_checksum="pred000000000001"))
        verdict = judged("probe_tracks_updates", hist)
        assert verdict.ok is False and verdict.evidence["stale_epochs"] == [2]
        assert bad(hist) == {"probe_tracks_updates"}  # 3 distinct checksums still count as changing

    def test_unchanged_probe_without_updates_in_between_is_fine(self):
        # No parameter moved during epoch 2 (steps 11-15), so an unchanged probe there is right.
        hist = history("stage1_param_only", lambda r: _edit(
            _edit(r, "train_step", lambda s: s["epoch"] == 2, **{f"param_delta_{g}": 0.0 for g in GROUPS}),
            "val_epoch", lambda v: v["epoch"] == 2, probe_pred_checksum="pred000000000001"))
        assert judged("probe_tracks_updates", hist).ok is True

    def test_weight_decay_alone_is_not_a_stale_probe(self):
        # A model whose outputs ignore its weights: zero gradients, yet AdamW's decay moves them.
        # Its unchanged probe is right (loss_decreases and param_head_learning judge it), not stale.
        zero_grads = {f"grad_norm_{g}": 0.0 for g in GROUPS}
        stuck = history("stage1_param_only", stale_probe, lambda r: _edit(r, "train_step", **zero_grads))
        assert judged("probe_tracks_updates", stuck).ok is True
        # the same history with one group still getting gradients: a stale evaluation again
        alive = history("stage1_param_only", stale_probe,
                        lambda r: _edit(r, "train_step", **{**zero_grads, "grad_norm_param_head": 0.3}))
        assert judged("probe_tracks_updates", alive).ok is False

    @pytest.mark.parametrize("from_checkpoint,expected", [(False, False), (True, True)])
    def test_a_small_drop_is_enough_from_a_checkpoint(self, from_checkpoint, expected):
        def one_percent(records):  # the loss falls linearly by 1% over the run
            steps = [r for r in records if r["kind"] == "train_step"]
            return _edit(records, "train_step", loss=lambda r: 0.5 * (1 - 0.01 * steps.index(r) / (len(steps) - 1)))
        hist = history("stage2_hybrid", one_percent, lambda r: _edit(r, "init", from_checkpoint=from_checkpoint))
        assert judged("loss_decreases", hist).ok is expected

    def test_a_rising_loss_is_bad_even_from_a_checkpoint(self):
        def rising(records):
            steps = [r for r in records if r["kind"] == "train_step"]
            return _edit(records, "train_step", loss=lambda r: 0.5 + 0.01 * steps.index(r))
        hist = history("stage2_hybrid", rising, lambda r: _edit(r, "init", from_checkpoint=True))
        verdict = judged("loss_decreases", hist)
        assert verdict.ok is False and "must not rise from a checkpoint" in verdict.detail

    def test_non_finite_loss_in_a_step(self):
        hist = history("stage2_hybrid", lambda r: _edit(r, "train_step", lambda s: s["step"] == 3, loss=float("nan")))
        verdict = judged("finite", hist)
        assert verdict.ok is False and verdict.evidence == {"columns": ["loss"]}

    def test_non_finite_gradient_norm_detail(self):
        verdict = judged("finite", history("stage2_hybrid", non_finite_grad))
        assert verdict.ok is False and verdict.detail == "non-finite values in ['grad_norm_total']"

    def test_residual_warnings_alone(self):
        # Two inactivity warnings while the branch does contribute: only the warning signal is red.
        assert bad(history("stage2_hybrid", with_warnings(2))) == {"residual_not_inactive"}

    def test_probe_rank_checksums_diverging(self):
        hist = history("stage2_hybrid", lambda r: _edit(r, "val_epoch", lambda v: v["epoch"] == 3,
                                                        rank_probe_checksums=["q3", "q3", "q3-other"]), world_size=3)
        verdict = judged("ranks_in_sync", hist)
        assert verdict.ok is False
        assert verdict.evidence["diverged"] == [{"epoch": 3, "field": "rank_probe_checksums",
                                                 "values": ["q3", "q3", "q3-other"]}]

    def test_all_good_is_false_on_any_fault(self):
        assert not all_good(judge(history("stage1_param_only", data_bound)))


# ---------------------------------------------------------------------------- not applicable

def _no_scores(records):
    return _drop(records, "val_epoch", "val_proxy_total", "probe_proxy_total_score", "probe_pixel")


def _no_deltas(records):
    return _drop(records, "train_step", *(f"param_delta_{g}" for g in GROUPS))


def _no_clipping(records):
    return _drop(records, "train_step", "grad_clipped")


def _from_checkpoint(records):
    return _edit(init_not_identity(records), "init", from_checkpoint=True)


def _resumed(records):
    return [r for r in records if r["kind"] != "init"]


def _no_steps(records):
    return [r for r in records if r["kind"] != "train_step"]


def _no_val(records):
    return [r for r in records if r["kind"] != "val_epoch"]


NOT_APPLICABLE = [
    # (signal, stage, faults, builder options, words of the detail)
    ("scores_move", "stage2_hybrid", (), {"epochs": 1, "steps_per_epoch": 8}, "needs >= 2 validation epochs, got 1"),
    ("scores_move", "stage2_hybrid", (_no_scores,), {}, "no validation scores recorded"),
    ("probe_checksums_change", "stage2_hybrid", (), {"instrumentation": False}, "instrumentation on"),
    ("probe_checksums_change", "stage1_param_only", (), {"epochs": 1, "steps_per_epoch": 8}, ">= 2 epochs"),
    ("probe_tracks_updates", "stage2_hybrid", (), {"instrumentation": False}, "needs probe checksums"),
    ("probe_tracks_updates", "stage2_hybrid", (), {"epochs": 1, "steps_per_epoch": 8}, "needs probe checksums"),
    ("probe_tracks_updates", "stage2_hybrid", (_no_deltas,), {}, "no parameter deltas recorded"),
    ("residual_contributes", "stage1_param_only", (), {}, "residual branch is off in stage1_param_only"),
    ("residual_contributes", "stage2_hybrid", (), {"instrumentation": False}, "instrumentation off"),
    ("residual_head_learning", "stage1_param_only", (), {}, "residual branch is off in stage1_param_only"),
    ("residual_head_learning", "stage3_finetune", (), {"instrumentation": False}, "instrumentation off"),
    ("residual_not_inactive", "stage1_param_only", (with_warnings(5),), {}, "residual branch is off"),
    ("residual_not_inactive", "stage2_hybrid", (), {"instrumentation": False}, "instrumentation off"),
    ("beats_identity", "stage2_hybrid", (_no_val,), {}, "no validation epoch with an identity baseline"),
    ("beats_constant_lens", "stage1_param_only", (), {"instrumentation": False},
     "no constant-lens score recorded"),
    ("not_data_bound", "stage2_hybrid", (data_bound,), {"perf": False}, "debug_perf_enabled off"),
    ("init_is_identity", "stage2_hybrid", (_from_checkpoint,), {}, "initialized from a checkpoint"),
    ("init_is_identity", "stage3_finetune", (_resumed,), {}, "no init check recorded"),
    ("loss_decreases", "stage2_hybrid", (loss_flat,), {"epochs": 1, "steps_per_epoch": 5}, "needs >= 6 training steps"),
    ("finite", "stage2_hybrid", (_no_steps,), {}, "no training steps recorded"),
    ("clipping_sane", "stage2_hybrid", (always_clipped, _no_clipping), {}, "no clipping record"),
    ("param_head_not_saturated", "stage2_hybrid", (), {"instrumentation": False}, "no saturation record"),
    ("param_head_learning", "stage2_hybrid", (), {"instrumentation": False}, "instrumentation off"),
    ("ranks_in_sync", "stage2_hybrid", (), {"world_size": 1}, "single process"),
    ("backbone_learning", "stage2_hybrid", (), {"instrumentation": False}, "instrumentation off"),
    ("optimizer_covers_params", "stage2_hybrid", (), {"instrumentation": False}, "no optimizer coverage"),
    ("eval_deterministic", "stage2_hybrid", (), {"instrumentation": False}, "no repeated probe"),
    ("eval_residual_matches_train", "stage1_param_only", (), {}, "residual branch is off"),
    ("eval_residual_matches_train", "stage2_hybrid", (residual_frozen,), {},
     "below its floor in training and at eval"),
    ("residual_helps", "stage1_param_only", (), {}, "residual branch is off"),
    ("residual_helps", "stage2_hybrid", (), {"instrumentation": False}, "no residual-zeroed validation"),
    ("batches_in_range", "stage2_hybrid", (), {"instrumentation": False}, "no batch ranges"),
    ("batches_vary", "stage2_hybrid", (), {"instrumentation": False}, "needs >= 3 fingerprinted"),
    ("pairs_match_ground_truth", "stage2_hybrid", (), {"ground_truth": False}, "no ground truth"),
    ("groups_move_with_gradients", "stage2_hybrid", (), {"instrumentation": False}, "no gradient norms"),
    ("logged_quantities_agree", "stage2_hybrid", (_resumed, _no_deltas), {"instrumentation": False},
     "nothing to cross-check"),
    ("train_val_agree", "stage2_hybrid", (eval_other_weights,), {"epochs": 2}, "needs >= 3 validations, got 2"),
    ("train_val_agree", "stage1_param_only", (eval_other_weights, lambda r: _edit(r, "val_epoch",
                                                                              val_ids_match_train=False)), {},
     "not the training epoch's"),
    ("params_track_ground_truth", "stage2_hybrid", (), {"ground_truth": False}, "no ground truth"),
    ("params_track_ground_truth", "stage1_param_only", (wrong_lens,), {"epochs": 1, "steps_per_epoch": 7},
     "needs >= 8 training steps, got 7"),
    ("eval_flow_matches_train", "stage1_param_only", (), {}, "residual branch is off"),
    ("eval_flow_matches_train", "stage2_hybrid", (), {"instrumentation": False}, "no train-vs-eval flow"),
    ("val_batches_repeat", "stage3_finetune", (val_augmented,), {"epochs": 1}, "needs fingerprints of >= 2"),
    ("lr_not_mostly_zero", "stage2_hybrid", (lambda r: _drop(r, "train_step", "lr", "lr_groups"),), {},
     "no learning rate"),
    ("group_lr_not_negligible", "stage2_hybrid", (lambda r: _edit(r, "train_step", lr_groups=[1e-3]),), {},
     "one param group"),
    ("group_lr_not_negligible", "stage2_hybrid", (lambda r: _drop(r, "train_step", "lr_groups"),), {},
     "no per-group learning rates"),
    ("loss_not_regularizer_bound", "stage2_hybrid",
     (lambda r: _drop(r, "train_step", "loss_parts", "pixel", "pixel_weighted", "flow_tv", "flow_tv_weighted"),), {},
     "no regularizer parts"),
    ("loop_validation_in_eval_mode", "stage2_hybrid", (lambda r: [x for x in r if x["kind"] != "loop_validation"],),
     {}, "no validation of its own"),
    ("weights_continue_across_epochs", "stage2_hybrid", (), {"epochs": 1}, "needs >= 2 epochs"),
]


class TestNotApplicable:
    @pytest.mark.parametrize("signal,stage,faults,options,words", NOT_APPLICABLE,
                             ids=[f"{c[0]}-{i}" for i, c in enumerate(NOT_APPLICABLE)])
    def test_signal_is_not_judged(self, signal, stage, faults, options, words):
        verdict = judged(signal, history(stage, *faults, **options))
        assert verdict.ok is None
        assert verdict.signal == signal
        assert words in verdict.detail

    def test_not_applicable_covers_every_signal(self):
        assert {case[0] for case in NOT_APPLICABLE} == set(SIGNALS)

    @pytest.mark.parametrize("stage", STAGES)
    def test_instrumentation_off(self, stage):
        result = verdicts(history(stage, instrumentation=False))
        assert {s for s, v in result.items() if v.ok is None} == INSTRUMENTED_ONLY | {"ranks_in_sync"} | RESIDUAL_OFF_NA
        assert {s for s, v in result.items() if v.ok is False} == set()

    def test_not_required_identity_is_reported_not_judged(self):
        cfg = JudgeConfig(require_beats_identity=False)
        verdict = judged("beats_identity", history("stage2_hybrid", identity_wins), cfg)
        assert verdict.ok is None
        assert "not required in this mode (model - identity = -0.0100" in verdict.detail
        assert verdict.evidence["delta"] == pytest.approx(-0.01)
        assert bad(history("stage2_hybrid", identity_wins), cfg) == {"beats_constant_lens"}  # still judged

    def test_finite_error_counts_without_steps(self):
        # A run that died on its first step: no train_step, but the error record is judged.
        verdict = judged("finite", history("stage2_hybrid", _no_steps, non_finite_error))
        assert verdict.ok is False and verdict.evidence == {"errors": 1}

    @pytest.mark.parametrize("hist", [pd.DataFrame(), frame([{"kind": "run_start", "stage": "stage2_hybrid",
                                                              "residual_branch_active": True, "world_size": 1}])],
                             ids=["empty", "run_start-only"])
    def test_a_run_without_records_judges_nothing(self, hist):
        result = judge(hist)
        assert [v.signal for v in result] == list(SIGNALS)
        assert [v.ok for v in result] == [None] * len(SIGNALS)
        assert all_good(result)

    def test_beats_identity_without_val_baseline(self):
        hist = history("stage2_hybrid", lambda r: _drop(r, "val_epoch", "identity_proxy_total", "gt_proxy_total"))
        assert judged("beats_identity", hist).ok is None


# ---------------------------------------------------------------------------- beats_identity

def _last_val_proxy(delta: float):
    return lambda records: _edit(records, "val_epoch", lambda v: v["epoch"] == 3,
                                 val_proxy_total=IDENTITY_PROXY + delta)


class TestBeatsIdentity:
    def test_gap_closed_fraction(self):
        verdict = judged("beats_identity", history("stage2_hybrid"))
        assert verdict.ok is True
        # (0.48 - 0.40) / (0.60 - 0.40)
        assert verdict.evidence["gap_closed_frac"] == pytest.approx(0.4)
        assert verdict.evidence["gt_proxy_total"] == GT_PROXY
        assert verdict.evidence["delta"] == pytest.approx(0.08)
        assert verdict.evidence["sample_count"] == 16
        assert verdict.detail == "model 0.4800 vs identity 0.4000, 40% of the gap to ground truth closed"

    def test_no_ground_truth_no_gap(self):
        verdict = judged("beats_identity", history("stage2_hybrid", ground_truth=False))
        assert verdict.ok is True
        assert "gap_closed_frac" not in verdict.evidence and "gap" not in verdict.detail

    def test_ground_truth_equal_to_identity_gives_no_gap(self):
        hist = history("stage2_hybrid", lambda r: _edit(r, "val_epoch", gt_proxy_total=IDENTITY_PROXY))
        verdict = judged("beats_identity", hist)
        assert verdict.ok is True and "gap_closed_frac" not in verdict.evidence

    @pytest.mark.parametrize("delta,ok", [(0.0021, True), (0.0019, False), (0.0, False), (-0.05, False)])
    def test_margin(self, delta, ok):
        verdict = judged("beats_identity", history("stage2_hybrid", _last_val_proxy(delta)))
        assert verdict.ok is ok
        assert verdict.evidence["margin"] == 0.002

    def test_gap_when_identity_wins(self):
        # (0.39 - 0.40) / (0.60 - 0.40) = -5 %
        verdict = judged("beats_identity", history("stage2_hybrid", identity_wins))
        assert verdict.evidence["gap_closed_frac"] == pytest.approx(-0.05)
        assert "-5% of the gap to ground truth closed" in verdict.detail

    def test_custom_margin(self):
        assert judged("beats_identity", history(), JudgeConfig(beats_identity_margin=0.1)).ok is False
        assert judged("beats_identity", history(), JudgeConfig(beats_identity_margin=0.07)).ok is True

    def test_only_the_last_epoch_counts(self):
        early_loss = history("stage2_hybrid", lambda r: _edit(r, "val_epoch", lambda v: v["epoch"] < 3,
                                                              val_proxy_total=0.30))
        late_loss = history("stage2_hybrid", _last_val_proxy(-0.01))
        assert judged("beats_identity", early_loss).ok is True
        assert judged("beats_identity", late_loss).ok is False


# ---------------------------------------------------------------------------- beats_constant_lens

def _last_constant_lens(delta: float):
    """The last epoch's model (0.48) beats its own mean lens by ``delta``."""
    return lambda records: _edit(records, "val_epoch", lambda v: v["epoch"] == 3,
                                 constant_lens_proxy_total=0.48 - delta)


class TestBeatsConstantLens:
    def test_good_detail_and_evidence(self):
        verdict = judged("beats_constant_lens", history("stage1_param_only"))
        assert verdict.ok is True
        assert verdict.detail == ("model 0.4800 vs its own mean lens on every image 0.4200 (+0.0600); "
                                  "k1 correlates +0.90 with ground truth")
        assert verdict.evidence == {"model_proxy_total": 0.48, "constant_lens_proxy_total": 0.42,
                                    "delta": pytest.approx(0.06), "margin": 0.01, "identity_proxy_total": 0.40,
                                    "param_corr_k1": 0.9, "param_corr_s": 0.8}

    def test_without_ground_truth_no_correlation(self):
        verdict = judged("beats_constant_lens", history("stage1_param_only", ground_truth=False))
        assert verdict.ok is True
        assert not any(key.startswith("param_corr_") for key in verdict.evidence)
        assert "correlates" not in verdict.detail

    def test_undefined_correlation_is_none(self):
        # a model predicting the same value for every image has no correlation (written as null)
        verdict = judged("beats_constant_lens", history("stage1_param_only", one_lens_for_all))
        assert verdict.evidence["param_corr_s"] is None and verdict.evidence["param_corr_k1"] == 0.02

    @pytest.mark.parametrize("delta,ok", [(0.0101, True), (0.0099, False), (0.0, False), (-0.02, False)])
    def test_margin(self, delta, ok):
        verdict = judged("beats_constant_lens", history("stage1_param_only", _last_constant_lens(delta)))
        assert verdict.ok is ok
        assert verdict.evidence["delta"] == pytest.approx(delta)

    def test_custom_margin(self):
        assert judged("beats_constant_lens", history(), JudgeConfig(beats_constant_lens_margin=0.07)).ok is False
        assert judged("beats_constant_lens", history(), JudgeConfig(beats_constant_lens_margin=0.05)).ok is True

    def test_only_the_last_epoch_counts(self):
        early = history("stage1_param_only", lambda r: _edit(r, "val_epoch", lambda v: v["epoch"] < 3,
                                                             constant_lens_proxy_total=0.60))
        assert judged("beats_constant_lens", early).ok is True
        assert judged("beats_constant_lens", history("stage1_param_only", _last_constant_lens(-0.01))).ok is False

    def test_not_required_is_reported_not_judged(self):
        cfg = JudgeConfig(require_beats_constant_lens=False)
        verdict = judged("beats_constant_lens", history("stage2_hybrid", one_lens_for_all), cfg)
        assert verdict.ok is None
        assert verdict.detail.startswith("not required in this mode (model 0.4800 vs its own mean lens")
        assert bad(history("stage2_hybrid", one_lens_for_all), cfg) == set()


# ---------------------------------------------------------------------------- thresholds

class TestJudgeConfig:
    @pytest.mark.parametrize("signal,fault,field,value,ok", [
        # 2 of 20 steps clipped (10 %); the limit is exclusive.
        ("clipping_sane", None, "clipping_max_frac", 0.1, False),
        ("clipping_sane", None, "clipping_max_frac", 0.11, True),
        ("clipping_sane", always_clipped, "clipping_max_frac", 1.01, True),
        # one warning is allowed by default, two are not
        ("residual_not_inactive", with_warnings(1), "inactive_max_warnings", 1, True),
        ("residual_not_inactive", with_warnings(2), "inactive_max_warnings", 1, False),
        ("residual_not_inactive", with_warnings(2), "inactive_max_warnings", 2, True),
        ("residual_not_inactive", with_warnings(1), "inactive_max_warnings", 0, False),
        # the loss falls (0.925 - 0.55) / 0.925 = 40.5 % from the first to the last epoch
        ("loss_decreases", None, "loss_min_relative_drop", 0.40, True),
        ("loss_decreases", None, "loss_min_relative_drop", 0.41, False),
        ("loss_decreases", loss_flat, "loss_min_relative_drop", 0.0, True),
        # data is 5 % of a step (75 % when data-bound)
        ("not_data_bound", None, "data_bound_max_frac", 0.04, False),
        ("not_data_bound", data_bound, "data_bound_max_frac", 0.8, True),
        # with a throughput floor, a data-heavy run at 200 samples/s above it is fine
        ("not_data_bound", data_bound, "min_samples_per_sec", 100.0, True),
        ("not_data_bound", data_bound, "min_samples_per_sec", 300.0, False),
        # 5 % of the parameters at their bounds; the limit is exclusive
        ("param_head_not_saturated", None, "saturation_max_frac", 0.05, False),
        ("param_head_not_saturated", saturated, "saturation_max_frac", 0.95, True),
        # residual contribution 0.05 px
        ("residual_contributes", None, "residual_min_px", 0.05, False),
        ("residual_contributes", None, "residual_min_px", 0.049, True),
        # at 128 x 128 one float32 step of the grid is 127 * 2**-23 = 1.514e-5 of prediction change;
        # an init prediction (or loss) off by 5e-5 is within 4 steps (6.06e-5), not within 3 (4.54e-5)
        ("init_is_identity", lambda r: _edit(r, "init", init_pred_max_abs_diff=5e-5), "init_ulps", 4.0, True),
        ("init_is_identity", lambda r: _edit(r, "init", init_pred_max_abs_diff=5e-5), "init_ulps", 3.0, False),
        ("init_is_identity", lambda r: _edit(r, "init", init_loss=1.0 + 5e-5), "init_ulps", 4.0, True),
        ("init_is_identity", lambda r: _edit(r, "init", init_loss=1.0 + 5e-5), "init_ulps", 3.0, False),
        # the proxy (thresholded) has its own absolute tolerance
        ("init_is_identity", lambda r: _edit(r, "init", init_proxy_total=IDENTITY_PROXY + 5e-4), "init_proxy_atol",
         1e-3, True),
        ("init_is_identity", lambda r: _edit(r, "init", init_proxy_total=IDENTITY_PROXY + 5e-4), "init_proxy_atol",
         4e-4, False),
    ])
    def test_threshold_decides(self, signal, fault, field, value, ok):
        hist = history("stage2_hybrid", *([fault] if fault else []))
        verdict = judged(signal, hist, JudgeConfig(**{field: value}))
        assert verdict.ok is ok, verdict.detail

    def test_saturation_uses_the_second_half(self):
        # Saturated on the first 12 of 20 steps: the median of all steps would be 0.9, that of
        # steps 11-20 is 0.05.
        hist = history("stage2_hybrid", lambda r: _edit(r, "train_step", lambda s: s["step"] <= 12,
                                                        params_at_bound_frac=0.9))
        assert judged("param_head_not_saturated", hist).ok is True

    def test_residual_contribution_uses_the_second_half(self):
        # Zero (initialized to identity) for 12 of 20 steps, active afterwards: the median of all
        # steps would be 0, that of steps 11-20 is 0.05 px.
        hist = history("stage2_hybrid", lambda r: _edit(r, "train_step", lambda s: s["step"] <= 12,
                                                        residual_contrib_px_mean=0.0))
        assert judged("residual_contributes", hist).ok is True

    @pytest.mark.parametrize("signal,field", [("param_head_learning", "grad_norm_param_head"),
                                              ("residual_head_learning", "grad_norm_residual_head"),
                                              ("residual_head_learning", "param_delta_residual_head")])
    @pytest.mark.parametrize("zero_steps,ok", [(8, True), (10, True), (12, False)])
    def test_head_learning_allows_up_to_half_zero_steps(self, signal, field, zero_steps, ok):
        # zero on 40 %, 50 % and 60 % of the 20 steps; more than half is bad
        hist = history("stage2_hybrid", lambda r: _edit(r, "train_step", lambda s: s["step"] <= zero_steps,
                                                        **{field: 0.0}))
        assert judged(signal, hist).ok is ok

    def test_default_config_is_used_when_none(self):
        hist = history("stage2_hybrid", with_warnings(2))
        assert judge(hist) == judge(hist, JudgeConfig())


# ---------------------------------------------------------------------------- judge on files, table

def _write_jsonl(records: list[Record], path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _write_with_metrics_writer(records: list[Record], path) -> None:
    writer = MetricsWriter(path)
    writer.start_fresh()
    for record in records:
        writer.write(record)
    writer.close()


class TestJudgeIO:
    @pytest.mark.parametrize("write", [_write_jsonl, _write_with_metrics_writer], ids=["json", "MetricsWriter"])
    @pytest.mark.parametrize("fault", [None, stale_probe, residual_frozen, non_finite_error, ranks_diverged],
                             ids=lambda f: f.__name__ if f else "healthy")
    def test_dataframe_file_and_folder_agree(self, tmp_path, write, fault):
        records = healthy_records("stage2_hybrid")
        if fault:
            records = fault(records)
        path = tmp_path / "metrics.jsonl"
        write(records, path)
        from_frame = judge(frame(records))
        assert judge(str(path)) == from_frame
        assert judge(tmp_path) == from_frame
        assert {v.signal for v in from_frame if v.ok is False} == (EXPECTED_BAD[fault]["stage2_hybrid"] if fault
                                                                   else set())

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no metrics file"):
            judge(tmp_path)

    def test_order_and_names(self):
        result = judge(history("stage1_param_only"))
        assert [v.signal for v in result] == list(SIGNALS)
        assert all(isinstance(v, Verdict) for v in result)

    def test_to_dict(self):
        verdict = judged("clipping_sane", history())
        assert verdict.to_dict() == {"signal": "clipping_sane", "ok": True, "detail": verdict.detail,
                                     "evidence": {"clipped_frac": pytest.approx(0.1), "allowed": 0.5}}

    def test_all_good(self):
        good, bad_, na = Verdict("a", True, ""), Verdict("b", False, ""), Verdict("c", None, "")
        assert all_good([good, na]) and all_good([na]) and all_good([])
        assert not all_good([good, na, bad_])

    def test_format_table(self):
        result = judge(history("stage1_param_only", data_bound))
        lines = format_table(result).splitlines()
        assert len(lines) == 2 + len(SIGNALS)
        assert lines[0].split() == ["signal", "verdict", "detail"]
        assert set(lines[1].replace(" ", "")) == {"-"}
        marks = {}
        for line, verdict in zip(lines[2:], result):
            name, mark = line.split()[:2]
            assert name == verdict.signal and line.endswith(verdict.detail)
            marks[name] = mark
        assert {n for n, m in marks.items() if m == "BAD"} == {"not_data_bound"}
        assert {n for n, m in marks.items() if m == "n/a"} == RESIDUAL_OFF_NA | {"ranks_in_sync"}
        assert {n for n, m in marks.items() if m == "GOOD"} == set(SIGNALS) - RESIDUAL_OFF_NA - {
            "ranks_in_sync", "not_data_bound"}
        # the verdict column is aligned: every mark starts at the same offset
        width = max(len(s) for s in SIGNALS)
        assert all(line[width + 2:width + 9].strip() in {"GOOD", "BAD", "n/a"} for line in lines[2:])


def test_evidence_of_a_run_whose_weights_never_move_is_json_without_nan():
    """lr 0: no step moves the weights, so there is no typical step change; the evidence says None
    (NaN would make report.json invalid JSON and never compare equal to itself)."""
    from autohdr.diagnosis.verdicts import weights_continue_across_epochs
    steps = pd.DataFrame({"kind": ["train_step"] * 4, "step": [1, 2, 3, 4], "epoch": [0, 0, 1, 1],
                          "weights_jump_before_epoch": [None, None, 0.0, None],
                          "param_delta_backbone": [0.0] * 4, "param_delta_param_head": [0.0] * 4})
    verdict = weights_continue_across_epochs(steps, JudgeConfig())
    assert verdict.ok is True and verdict.evidence["typical_step_change"] is None
    json.dumps(verdict.evidence, allow_nan=False)
