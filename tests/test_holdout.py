"""The hold-out (tests/holdout_faults.py): is each bug caught, and is the right cause named?

Each fault is one test: red when no signal goes BAD, or when none of the fault's expected causes is
named. Faults the diagnosis is known to miss are listed in :data:`KNOWN_MISSES` with what is missing;
they run as strict xfails, so one that starts passing turns the test red until it is taken off the
list. The healthy controls (the same runners, nothing broken) must be all good. ``test_holdout_tally``
prints caught / right-cause counts (``-s`` to see them).
"""

from __future__ import annotations

import json

import pytest

from tests.holdout_faults import HEALTHY_CONTROLS, HOLDOUT, bad_of, run_holdout
from tests.plugins.debug_runs import once_per_session

#: fault name -> (caught, right cause) as the diagnosis stands; a fault not listed must be both.
KNOWN_MISSES: dict[str, str] = {
    "batchnorm_frozen_stats": "at 8 steps the frozen statistics barely change the eval loss (val 0.277 vs train "
                              "0.305, inside the healthy band); an eval-vs-train-mode check on the same probe needs a "
                              "stage-1 train-mode probe pass (not recorded) and a threshold from healthy batch-norm "
                              "models (running statistics are only 57 % converged after 8 steps at momentum 0.1; no "
                              "healthy BN model in the suite to measure); nothing goes BAD (beats_constant_lens, its "
                              "only red before, needs 12 epochs: healthy runs this short lose to their own mean lens too)",
    "gradients_never_cleared": "no recorded figure separates accumulation from healthy training at 10 steps: the "
                               "gradient norm's second-half / first-half median is 1.5x (healthy 1.4x); Adam's "
                               "normalized update |delta| / (lr sqrt(n)) stays at 0.63-0.80 (healthy loops 0.25-0.54, "
                               "but the batch-norm hold-out model reaches 0.86); a crisp check needs the incoming vs "
                               "accumulated gradient per step (a tensor hook in the hooks being refactored); nothing "
                               "goes BAD (the baselines, its only red before, need 12 epochs: healthy runs this short "
                               "lose to them too)",
}

#: signal -> the hold-out fault that must turn it red (the invariants' red case on a real run).
PROVEN_BY_HOLDOUT: dict[str, str] = {
    "groups_move_with_gradients": "backbone_group_lr_zero",
    "logged_quantities_agree": "norm_before_backward",
    "train_val_agree": "slow_ema_at_eval",
    "params_track_ground_truth": "train_targets_off_by_one",
    "eval_flow_matches_train": "residual_flips_at_eval",
    "val_batches_repeat": "val_random_flips",
    "lr_not_mostly_zero": "schedule_one_epoch_floor0",
    "weights_continue_across_epochs": "resume_loads_initial_weights",
    "loss_not_regularizer_bound": "regularizer_weights_x1000",
}

#: fault name -> its :class:`~tests.holdout_faults.HoldoutResult` as a dict, as read by this process.
_RESULTS: dict[str, dict] = {}


def _result(name: str, tmp_path_factory) -> dict:
    """The fault's result, trained once per session: under pytest-xdist the first worker to ask trains
    it and stores it (``once_per_session``); the fault's own test, the invariant tests and the tally in
    any worker read that one result instead of training the fault again."""
    if name not in _RESULTS:
        fault = next(f for f in HOLDOUT if f.name == name)
        _RESULTS[name], _ = once_per_session(tmp_path_factory, "holdout", name,
                                             lambda folder: run_holdout(fault, folder).__dict__)
    return _RESULTS[name]


@pytest.mark.parametrize("name", [f.name for f in HOLDOUT])
def test_holdout_fault_is_caught_with_its_cause(name, tmp_path_factory, request):
    if name in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[name]))
    result = _result(name, tmp_path_factory)
    fault = next(f for f in HOLDOUT if f.name == name)
    assert result["caught"], f"{name}: no signal BAD (expected {fault.expected_signals})"
    assert result["right_cause"], (f"{name}: causes {result['cause_ids']} for BAD {result['bad_signals']}, "
                                   f"expected one of {fault.expected_causes}: {json.dumps(result['detail'])[:800]}")


@pytest.mark.parametrize("signal", list(PROVEN_BY_HOLDOUT))
def test_invariant_is_red_on_its_holdout_fault(signal, tmp_path_factory):
    result = _result(PROVEN_BY_HOLDOUT[signal], tmp_path_factory)
    assert signal in result["bad_signals"], (signal, result["bad_signals"])


@pytest.mark.parametrize("name,run", HEALTHY_CONTROLS, ids=[n for n, _ in HEALTHY_CONTROLS])
def test_holdout_runners_are_healthy_without_a_fault(name, run, tmp_path):
    out = run(tmp_path / name)
    assert out["error"] is None
    assert bad_of(out) == [], [v for v in out["verdicts"] if v["ok"] is False]


def test_holdout_tally(tmp_path_factory):
    """Caught / right cause over the whole hold-out (the figures of the issue's closing note)."""
    results = [_result(f.name, tmp_path_factory) for f in HOLDOUT]
    caught = sum(r["caught"] for r in results)
    right = sum(r["caught"] and r["right_cause"] for r in results)
    for r in results:
        print(f"{r['fault']}: caught={r['caught']} right_cause={r['right_cause']} bad={r['bad_signals']} "
              f"causes={r['cause_ids']}")
    print(f"hold-out: {caught}/{len(results)} caught, right cause for {right}")
    misses = {r["fault"] for r in results if not (r["caught"] and r["right_cause"])}
    assert misses == set(KNOWN_MISSES), f"misses {sorted(misses)} vs KNOWN_MISSES {sorted(KNOWN_MISSES)}"
