"""autohdr.attach on a competition-shaped loop (tests/competition_loop.py): 3 added lines, no BAD
when healthy; a folder that already holds a run is refused; the run records what it is."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from autohdr.data.settings import default_fixture_root
from autohdr.diagnosis.causes import diagnose
from autohdr.runs.debug import build_loaders, select_rows
from autohdr.diagnosis.hooks import Instrumentation
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.runs.presets import load_preset
from autohdr.diagnosis.run_intent import ExistingRunError, judge_config_for
from autohdr.diagnosis.verdicts import judge
from tests import competition_loop
from tests.competition_loop import LoopFaults, run_competition_loop


@pytest.fixture(scope="module")
def loaders():
    data = dataclasses.replace(load_preset("stage2_probe").data, num_pairs=8, resize_hw=(64, 64), batch_size=4)
    train_rows, val_rows = select_rows(default_fixture_root(), data)
    return build_loaders(train_rows, val_rows, data, 0)


def _judged(run_dir):
    history = read_metrics(run_dir)
    verdicts = judge(history, judge_config_for(history))
    return history, {v.signal: v for v in verdicts}, diagnose(verdicts, history)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, loaders):
    run_dir = tmp_path_factory.mktemp("attach") / "healthy"
    run_competition_loop(run_dir, *loaders, epochs=4)
    return run_dir


def test_the_loop_needs_three_added_lines():
    source = inspect.getsource(competition_loop)
    assert sum(line.rstrip().endswith("# autohdr") for line in source.splitlines()) == 3


def test_healthy_competition_loop_has_no_bad_signal(healthy):
    history, verdicts, _ = _judged(healthy)
    bad = {name: v.detail for name, v in verdicts.items() if v.ok is False}
    assert not bad
    steps = history[history["kind"] == "train_step"]
    assert len(steps) == 8 and steps["lr_groups"].map(len).eq(3).all()
    for signal in ("residual_head_learning", "groups_move_with_gradients", "loss_decreases", "init_is_identity"):
        assert verdicts[signal].ok is True, signal


def test_the_run_records_its_intent_and_the_judge_uses_it(healthy):
    history = read_metrics(healthy)
    start = history[history["kind"] == "run_start"].iloc[-1]
    assert start["intent"] == "probe"
    assert judge_config_for(history).require_beats_constant_lens is False


def test_clipping_is_seen_without_being_told(tmp_path, loaders):
    run_dir = tmp_path / "clip"
    engine = competition_loop.Engine(*loaders, epochs=1, base_lrs={"backbone": 1e-3, "param_head": 3e-3,
                                                                   "residual_head": 3e-3}, clip=1e-4)
    import autohdr
    with autohdr.attach(engine.model, engine.optimizer, run_dir, val_loader=loaders[1], loss=engine.loss_fn,
                        scaler=engine.scaler):
        engine.fit()
    steps = read_metrics(run_dir).query("kind == 'train_step'")
    assert steps["grad_clipped"].iloc[1:].all()
    assert (steps["clip_norm"].dropna() <= 1.01e-4).all()


def test_a_folder_with_a_run_is_refused_and_left_as_it_was(healthy, loaders):
    before = (healthy / "metrics.jsonl").read_bytes()
    with pytest.raises(ExistingRunError, match="already holds a run .*resume_step"):
        run_competition_loop(healthy, *loaders, epochs=1)
    model = competition_loop.Engine(*loaders, epochs=1, base_lrs={"backbone": 1e-3, "param_head": 1e-3,
                                                                  "residual_head": 1e-3}).model
    hooks = Instrumentation(model, torch.optim.SGD(model.parameters(), lr=0.1), healthy)
    with pytest.raises(ExistingRunError):
        hooks.on_train_start(loaders[1])
    assert (healthy / "metrics.jsonl").read_bytes() == before


#: The loop's faults (tests/competition_loop.py LoopFaults), 2 epochs (4 steps) each: the signal that
#: must go red, and the cause that must be named with the words its line must hold.
LOOP_FAULTS = {
    "residual_group_lr_zero": (LoopFaults(zero_lr_group="residual_head"), "group_lr_not_negligible", "group_lr_zero",
                               ("param group 2 (residual_head)", "configured lr 0", "set that group's lr")),
    "regularizer_weights_x1000": (LoopFaults(reg_scale=1000.0), "loss_not_regularizer_bound",
                                  "regularizer_weights_too_large", ("flow_mag, flow_smooth", "of the total loss",
                                                                    "lower those weights")),
    "validate_without_eval": (LoopFaults(validate_in_train_mode=True), "loop_validation_in_eval_mode",
                              "loop_validation_train_mode", ("4 of 4 forwards in train mode",
                                                             "call model.eval() before validating")),
}


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, loaders):
    out = {}
    for name, (faults, *_rest) in LOOP_FAULTS.items():
        run_dir = tmp_path_factory.mktemp("attach-faults") / name
        run_competition_loop(run_dir, *loaders, epochs=2, faults=faults)
        out[name] = _judged(run_dir)
    return out


@pytest.mark.parametrize("name", list(LOOP_FAULTS))
def test_each_loop_fault_is_red_with_its_cause_named(name, fault_runs):
    _, verdicts, diagnoses = fault_runs[name]
    _, signal, cause_id, words = LOOP_FAULTS[name]
    assert verdicts[signal].ok is False, verdicts[signal].detail
    bad = {n for n, v in verdicts.items() if v.ok is False}
    named = {d.cause_id: d for d in diagnoses}
    assert cause_id in named, [(d.cause_id, d.signals) for d in diagnoses]
    assert signal in named[cause_id].signals
    for word in words:
        assert word in named[cause_id].cause, named[cause_id].cause
    assert "unexplained" not in named, named["unexplained"].signals  # every BAD signal has the named cause
    assert bad == {s for d in diagnoses for s in d.signals}


def test_the_new_loop_signals_are_green_on_the_healthy_loop(healthy):
    _, verdicts, _ = _judged(healthy)
    for signal in ("group_lr_not_negligible", "loss_not_regularizer_bound", "loop_validation_in_eval_mode",
                   "weights_continue_across_epochs"):
        assert verdicts[signal].ok is True, (signal, verdicts[signal].detail)
    assert verdicts["loss_not_regularizer_bound"].evidence["regularizer_share_median"] < 0.01  # measured 0.46 %
