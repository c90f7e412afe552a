"""Invariants any healthy run keeps, judged on real runs: short healthy runs are never BAD, the
causes' declared evidence is what real runs write, and each new cause is named from the real
signals' verdicts (no hand-made evidence)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from autohdr.diagnosis.causes import RULE_READS, RULES, diagnose
from autohdr.runs.debug import run_debug_mode
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.diagnosis.verdicts import MIN_STEPS, JudgeConfig, judge
from tests import test_verdicts as tv
from tests.holdout_faults import HEALTHY_CONTROLS, HOLDOUT


# ---------------------------------------------------------------------------- minimum evidence

@pytest.mark.parametrize("mode", ["overfit_stage1", "stage2_probe", "stage3_probe"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_short_healthy_runs_are_never_bad(mode, steps, tmp_path):
    """1, 2 and 4 steps of a healthy run (8 / 8 / 16 pairs at 64 px, batch 4, one epoch): every
    signal GOOD or n/a (before the minimum-steps guards: backbone_learning, residual_contributes and
    eval_residual_matches_train BAD at 1 step, beats_identity / beats_constant_lens / residual_helps
    / not_data_bound at 2-4)."""
    overrides = {"data.num_pairs": 8 if steps < 4 else 16, "data.resize_hw": [64, 64], "data.batch_size": 4}
    if steps == 1:
        overrides["train.max_steps_per_epoch"] = 1
    report = run_debug_mode(mode, out_dir=tmp_path / "run", device="cpu", overrides=overrides, epochs=1,
                            plots=False, log=lambda message: None)
    assert report["figures"]["steps"] == steps
    assert [v for v in report["verdicts"] if v["ok"] is False] == []


def test_below_the_minimum_a_signal_says_na_with_the_number():
    hist = tv.history("stage1_param_only", tv.backbone_starved, epochs=1, steps_per_epoch=1)
    verdict = {v.signal: v for v in judge(hist)}["backbone_learning"]
    assert verdict.ok is None and verdict.detail == "needs >= 2 training steps to mean anything, got 1"
    # at the minimum, the same fault is BAD
    hist = tv.history("stage1_param_only", tv.backbone_starved, epochs=1, steps_per_epoch=2)
    assert {v.signal: v for v in judge(hist)}["backbone_learning"].ok is False
    for signal, field in MIN_STEPS.items():
        assert getattr(JudgeConfig(), field) >= 1, signal


# ---------------------------------------------------------------------------- declared evidence

def _key_written(key: str, histories) -> bool:
    kind, _, name = key.partition(".")
    for history in histories:
        rows = history[history["kind"] == kind] if "kind" in history else history.iloc[0:0]
        if name.startswith("config."):
            config = rows.iloc[-1].get("config") if len(rows) and "config" in rows else None
            if isinstance(config, dict) and name[len("config."):] in config:
                return True
        elif name.endswith("*"):
            if any(c.startswith(name[:-1]) and rows[c].notna().any() for c in rows.columns):
                return True
        elif name in rows.columns and rows[name].notna().any():
            return True
    return False


@pytest.fixture(scope="module")
def real_histories(tmp_path_factory):
    """A healthy debug run (stage 2), a healthy hand-written loop, a run with out-of-range inputs, and
    the competition loop attached (one epoch: its own validation)."""
    runs = dict(HEALTHY_CONTROLS)
    out = []
    for name, run in (("debug_stage2", runs["debug_stage2"]), ("hand_loop", runs["hand_loop"]),
                      ("bad_inputs", next(f.run for f in HOLDOUT if f.name == "imagenet_normalized_inputs")),
                      ("attached", _attached_loop)):
        folder = tmp_path_factory.mktemp(name)
        run(folder / "run")
        out.append(read_metrics(folder / "run"))
    return out


def _attached_loop(run_dir: Path) -> None:
    import dataclasses
    from autohdr.data.settings import default_fixture_root
    from autohdr.runs.debug import build_loaders, select_rows
    from autohdr.runs.presets import load_preset
    from tests.competition_loop import run_competition_loop
    data = dataclasses.replace(load_preset("stage2_probe").data, num_pairs=8, resize_hw=(64, 64), batch_size=4)
    run_competition_loop(run_dir, *build_loaders(*select_rows(default_fixture_root(), data), data, 0), epochs=1)


def test_every_rule_declares_what_it_reads():
    named = {rule.__name__ for rule in RULES}
    assert named - set(RULE_READS) <= {"_pairs_mismatched", "_batch_repeats", "_diverged", "_optimizer_mismatch",
                                       "_residual_hurts", "_ranks_unsynced", "_ignores_input"}  # verdicts only


def test_every_declared_evidence_key_is_written_by_a_real_run(real_histories):
    missing = sorted({key for keys in RULE_READS.values() for key in keys
                      if not _key_written(key, real_histories)})
    assert missing == []


def test_written_fields_are_not_the_only_check(real_histories):
    # red case of the check itself: a key no run writes is reported missing
    assert not _key_written("train_step.batch_sample_ids", real_histories)
    assert not _key_written("run_start.config.no_such_setting", real_histories)


# ---------------------------------------------------------------------------- causes from the real signals

def _with_optimizer_groups(records, groups):
    records = copy.deepcopy(records)
    for rec in records:
        if rec["kind"] == "run_start":
            rec["optimizer_groups"] = groups
        if rec["kind"] == "train_step":
            rec["lr_groups"] = [g["lr"] for g in groups]
    return records


CAUSE_CASES = {
    "group_lr_zero": ("stage1_param_only", [tv.group_lr_zero, lambda r: _with_optimizer_groups(r, [
        {"lr": 0.0, "groups": ["backbone"], "tensors": 10}, {"lr": 1e-3, "groups": ["param_head"], "tensors": 4}])],
        {"groups_move_with_gradients", "group_lr_not_negligible"}),
    "group_lr_negligible": ("stage2_hybrid", [tv.group_lr_negligible, lambda r: tv._edit(r, "run_start", optimizer_groups=[
        {"lr": 1e-3, "groups": ["backbone"], "tensors": 10},
        {"lr": 1e-6, "groups": ["param_head", "residual_head"], "tensors": 8}])], {"group_lr_not_negligible"}),
    "regularizer_weights_too_large": ("stage2_hybrid", [tv.regularizers_swamp_loss], {"loss_not_regularizer_bound"}),
    "loop_validation_train_mode": ("stage3_finetune", [tv.validate_in_train_mode], {"loop_validation_in_eval_mode"}),
    "resume_wrong_weights": ("stage1_param_only", [tv.weights_reloaded], {"weights_continue_across_epochs"}),
    # single BAD signals whose own recorded figure names the problem
    "loader_bound": ("stage1_param_only", [tv.data_bound], {"not_data_bound"}),
    "init_not_identity": ("stage2_hybrid", [tv.init_not_identity], {"init_is_identity"}),
    "head_saturated_at_init": ("stage1_param_only", [tv.saturated], {"param_head_not_saturated"}),
    "ranks_unsynced": ("stage2_hybrid", [tv.ranks_diverged], {"ranks_in_sync"}),
    "residual_wrong_units": ("stage3_finetune", [tv.residual_wrong_units], {"residual_contributes"}),
    "ignores_input": ("stage1_param_only", [tv.one_lens_for_all], {"beats_constant_lens"}),
    # the same prediction for every image: exactly its own mean lens, no correlation defined
    "ignores_input#constant": ("stage1_param_only", [tv.one_lens_for_all, lambda r: tv._edit(
        r, "val_epoch", constant_lens_proxy_total=lambda v: v["val_proxy_total"], pred_gt_corr_k1=None)],
        {"beats_constant_lens"}),
    # a frozen head that weight decay still moves: one fault, one cause
    "frozen_residual_head#weight-decay": ("stage2_hybrid", [tv.residual_frozen, lambda r: tv._edit(
        r, "train_step", param_delta_residual_head=1e-6)], {"groups_move_with_gradients", "residual_head_learning",
                                                            "residual_not_inactive", "residual_contributes"}),
    # without recorded optimizer groups: one group still while the others move, all parameters optimized
    "group_lr_zero#no-groups": ("stage1_param_only", [tv.group_lr_zero], {"groups_move_with_gradients"}),
    "metric_wiring": ("stage2_hybrid", [tv.norm_before_backward], {"logged_quantities_agree"}),
    "loss_summed": ("stage2_hybrid", [tv.loss_summed], {"logged_quantities_agree", "train_val_agree"}),
    "eval_differs_from_train": ("stage1_param_only", [tv.eval_other_weights], {"train_val_agree"}),
    "wrong_lens": ("stage1_param_only", [tv.wrong_lens], {"params_track_ground_truth"}),
    "eval_residual_off": ("stage2_hybrid", [tv.residual_flipped_at_eval], {"eval_flow_matches_train"}),
    "val_random": ("stage3_finetune", [tv.val_augmented], {"val_batches_repeat"}),
    "lr_schedule_zero": ("stage1_param_only", [tv.lr_schedule_ends],
                         {"lr_not_mostly_zero", "groups_move_with_gradients", "probe_checksums_change"}),
    "optimizer_hparams": ("stage1_param_only", [tv.loss_flat, lambda r: _with_optimizer_groups(r, [
        {"lr": 1e-3, "eps": 1.0, "weight_decay": 1e-4, "groups": ["backbone", "param_head"], "tensors": 14}])],
        {"loss_decreases"}),
}


@pytest.mark.parametrize("cause_id", list(CAUSE_CASES))
def test_each_cause_is_named_from_the_real_signals(cause_id):
    stage, faults, expected_bad = CAUSE_CASES[cause_id]
    hist = tv.history(stage, *faults)
    verdicts = judge(hist)
    assert {v.signal for v in verdicts if v.ok is False} == expected_bad
    diagnoses = diagnose(verdicts, hist)
    assert [d.cause_id for d in diagnoses] == [cause_id.partition("#")[0]], diagnoses
    assert set(diagnoses[0].signals) == expected_bad


def test_frozen_only_when_the_gradient_is_really_zero():
    """Gradients on every step and no group moving is a skipped update, not a frozen group; a group
    whose gradient is zero is frozen or detached."""
    moving_nothing = lambda r: tv._edit(r, "train_step", **{f"param_delta_{g}": 0.0 for g in tv.GROUPS})
    hist = tv.history("stage1_param_only", moving_nothing)
    causes = [d.cause_id for d in diagnose(judge(hist), hist)]
    assert causes[0] == "update_skipped" and not any(c.startswith("frozen_") for c in causes)
    hist = tv.history("stage1_param_only", tv.backbone_starved)
    assert [d.cause_id for d in diagnose(judge(hist), hist)] == ["frozen_backbone"]


# ----------------------------------------------------------------------------- overfit minimum evidence

OVERFIT_SIGNALS = ("beats_identity", "beats_constant_lens", "params_track_ground_truth")


@pytest.mark.parametrize("epochs", [4, 11, 12])
def test_overfit_signals_need_twelve_epochs_where_required(epochs):
    """Healthy overfit runs lose to identity up to 4 epochs and to their own mean lens up to 8 (seeds 0-2):
    below ``overfit_min_epochs`` the three overfit signals are n/a naming it; from it they are judged."""
    cfg = JudgeConfig(overfit_min_epochs=12)
    verdicts = {v.signal: v for v in judge(tv.frame(tv.healthy_records("stage1_param_only", epochs=epochs)), cfg)}
    for signal in OVERFIT_SIGNALS:
        if epochs < 12:
            assert verdicts[signal].ok is None and verdicts[signal].evidence == {"min_epochs": 12, "epochs": epochs}
        else:
            assert "min_epochs" not in verdicts[signal].evidence, verdicts[signal]


def test_the_guard_leaves_a_signal_that_is_not_required_alone():
    cfg = JudgeConfig(overfit_min_epochs=12, require_beats_identity=False, require_beats_constant_lens=False)
    verdicts = {v.signal: v for v in judge(tv.frame(tv.healthy_records("stage1_param_only")), cfg)}
    assert all(verdicts[s].detail.startswith(("not required", "this mode is not expected")) for s in OVERFIT_SIGNALS)


def test_an_overfit_intent_gets_the_guard_and_the_preset_sets_it():
    from autohdr.diagnosis.run_intent import judge_config_for
    from autohdr.diagnosis.verdicts import OVERFIT_MIN_EPOCHS
    from autohdr.runs.presets import load_preset
    records = tv.healthy_records("stage1_param_only")
    assert OVERFIT_MIN_EPOCHS == 12 == load_preset("overfit_stage1").judge.overfit_min_epochs
    assert load_preset("stage2_probe").judge.overfit_min_epochs == 0
    for intent, expected in (("overfit", OVERFIT_MIN_EPOCHS), ("probe", 0)):
        records[0] = {**records[0], "intent": intent}
        assert judge_config_for(tv.frame(records)).overfit_min_epochs == expected, intent
