"""The diagnosis observers: the records they write are the records written before the split.

``tests/data/golden_metrics.json`` holds every record (minus clock fields) of the golden runs
(``tests/golden_runs.py``) as the code before the observers split wrote them
(``scripts/make_golden_metrics.py``); each run here must write exactly those, key by key and in order.
"""

from __future__ import annotations

import json

import pytest

from tests import golden_runs


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(golden_runs.FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(golden_runs.RUNS))
def test_records_are_the_golden_records(golden, tmp_path, name):
    expected = golden["runs"][name]
    actual = golden_runs.run(name, tmp_path / name)
    assert golden_runs.structure(actual) == golden_runs.structure(expected), \
        "\n".join(golden_runs.differences(expected, actual, values=False))
    here, made = golden_runs.environment(name), golden_runs.stored_environment(golden, name)
    if here != made:
        pytest.skip(f"structure matches; values not compared: the fixture was made with {made}, "
                    f"this is {here} (floats are bit-exact only on the same software and CPU kind)")
    problems = golden_runs.differences(expected, actual)
    assert not problems, "\n".join(problems[:40])


# ----------------------------------------------------------------------------- the observers, one by one

import math  # noqa: E402

import torch  # noqa: E402

from autohdr.diagnosis.hooks import STATE_VERSION, Instrumentation  # noqa: E402
from autohdr.diagnosis.observers.base import Observer, read_once  # noqa: E402
from autohdr.diagnosis.observers.batch_sanity import BatchSanityObserver, batch_range_tensors  # noqa: E402
from autohdr.diagnosis.observers.optimizer import OptimizerCoverage  # noqa: E402
from tests.helpers_trainer import fixture_batches, seeded  # noqa: E402


def hooks_for(tmp_path, **kwargs) -> Instrumentation:
    model = seeded()
    return Instrumentation(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, log=lambda m: None, **kwargs)


def test_every_observer_has_one_name_and_the_documented_hooks(tmp_path):
    hooks = hooks_for(tmp_path)
    assert list(hooks.observers) == ["loss", "grad_norms", "optimizer", "residual_activity", "batch_sanity",
                                     "param_deltas", "geometry", "validation", "probe", "rank_sync", "throughput"]
    for name, observer in hooks.observers.items():
        assert isinstance(observer, Observer) and observer.name == name


@pytest.mark.parametrize("value", [1.75, -0.5, float("nan"), float("inf"), float("-inf")])
def test_batch_range_from_one_pass_equals_the_exact_figures(value):
    batch = dict(fixture_batches()[1])
    batch["input_image"] = batch["input_image"].clone()
    batch["input_image"][1, 0, :3, :3] = value
    observer = BatchSanityObserver()
    observer.on_train_batch_start(batch)
    record = read_once(observer.step_tensors(None), torch.device("cpu"))
    observer.step_fields(record, type("Step", (), {"host": record})())
    exact = {k: float(v) for k, v in batch_range_tensors(batch).items()}
    assert {k: record[k] for k in exact} == exact
    assert record["batch_bad_sample"]["index"] == 1 and record["batch_bad_sample"]["image_id"] == batch["image_id"][1]


def test_an_id_less_batch_is_fingerprinted_from_the_pooled_pixels_in_the_one_read():
    batch = {"input_image": fixture_batches()[0]["input_image"]}
    observer = BatchSanityObserver()
    observer.on_train_batch_start(batch)
    tensors = observer.step_tensors(None)
    assert "_batch_pooled_input" in tensors
    host = read_once(tensors, torch.device("cpu"))
    record = {k: v for k, v in host.items() if not k.startswith("_")}
    observer.step_fields(record, type("Step", (), {"host": host})())
    from autohdr.diagnosis.checksum import tensor_checksum
    assert record["batch_fingerprint"] == tensor_checksum(batch["input_image"].float(), 3)


def test_read_once_is_one_transfer_of_exact_float64_values():
    values = {"a": torch.tensor(0.1, dtype=torch.float32), "b": torch.tensor(3, dtype=torch.int64),
              "c": torch.tensor(0.3, dtype=torch.bfloat16), "_d": torch.arange(6.0).reshape(2, 3)}
    host = read_once(values, torch.device("cpu"))
    assert host["a"] == float(values["a"]) and host["b"] == 3.0 and host["c"] == float(values["c"])
    assert torch.equal(host["_d"], values["_d"].double())


def test_coverage_after_every_parameter_had_a_gradient_looks_at_none():
    model = seeded()
    coverage = OptimizerCoverage(torch.optim.SGD(model.parameters(), lr=0.1))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    coverage.observe(model)
    assert coverage._pending == [] and coverage.report(model)["optimized_never_grad"] == []


# ----------------------------------------------------------------------------- state_dict versions

def test_state_dict_round_trips_every_observer(tmp_path):
    hooks = hooks_for(tmp_path / "a")
    hooks.on_train_epoch_start(1)
    hooks.validation.best_score, hooks.validation.best_epoch = 0.5, 2
    hooks.observers["residual_activity"].monitor.consecutive = 3
    state = hooks.state_dict()
    assert state["version"] == STATE_VERSION
    assert set(state["observers"]) == {"optimizer", "residual_activity", "param_deltas", "validation"}
    again = hooks_for(tmp_path / "b")
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_the_flat_state_of_earlier_releases_still_loads(tmp_path):
    hooks = hooks_for(tmp_path)
    hooks.load_state_dict({"global_step": 7, "epoch": 1, "best_score": 0.25, "best_epoch": 0,
                           "inactivity_monitor": {"consecutive": 2, "fired": 1},
                           "epoch_losses": [0.5, 0.25], "epoch_ids": ["b", "a"]})
    assert (hooks.global_step, hooks.epoch, hooks.best_score, hooks.best_epoch) == (7, 1, 0.25, 0)
    monitor = hooks.observers["residual_activity"].monitor
    assert (monitor.consecutive, monitor.fired) == (2, 1)
    state = hooks.state_dict()["observers"]["validation"]
    assert state["epoch_losses"] == [0.5, 0.25] and state["epoch_ids"] == ["a", "b"]


def test_a_state_of_a_newer_version_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"instrumentation state version 3 is newer than this autohdr reads \(2\)"):
        hooks_for(tmp_path).load_state_dict({"version": 3, "global_step": 1, "observers": {}})


def test_best_score_reads_through_to_the_validation_observer(tmp_path):
    hooks = hooks_for(tmp_path)
    assert hooks.best_score == -math.inf and hooks.best_epoch == -1
    hooks.best_score = 0.75
    assert hooks.validation.best_score == 0.75
