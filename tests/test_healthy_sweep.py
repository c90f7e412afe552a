"""scripts/healthy_sweep.py: the plan of runs, resuming, and the false-alarm table (runs are faked)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers_data import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "healthy_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("healthy_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(mode: str, variation: str, seed: int, bad: tuple[str, ...] = (), drop: float = 0.1) -> dict:
    verdicts = {"finite": [True, "ok"], "ranks_in_sync": [None, "single process"]}
    verdicts.update({signal: [False, "bad"] for signal in bad})
    return {"mode": mode, "variation": variation, "seed": seed, "overrides": {}, "wall_s": 1.0,
            "all_good": not bad, "error": None, "loss_relative_drop": drop, "verdicts": verdicts}


def test_summary_counts_each_bad_signal_with_where_it_happened(sweep):
    table = sweep.summarize([record("stage2_probe", "preset", 0, drop=0.2),
                             record("stage2_probe", "lr x3", 1, bad=("loss_decreases",), drop=-0.01),
                             record("stage2_probe", "batch 16", 2, bad=("loss_decreases", "clipping_sane"))])
    lines = table.splitlines()
    assert lines[0] == "stage2_probe: 3 healthy runs, 2 with a BAD signal; smallest loss drop -1.00%"
    assert lines[1] == "  loss_decreases: BAD in 2 (lr x3 s1, batch 16 s2)"
    assert lines[2] == "  clipping_sane: BAD in 1 (batch 16 s2)"
    assert sweep.summarize([record("stage3_probe", "preset", 0)]).splitlines() == [
        "stage3_probe: 1 healthy runs, 0 with a BAD signal; smallest loss drop 10.00%"]


def test_every_variation_changes_one_preset_key(sweep):
    labels = [label for label, _, _ in sweep.VARIATIONS]
    assert labels[0] == "preset" and len(set(labels)) == len(labels) == 9
    keys = {key for _, key, _ in sweep.VARIATIONS[1:]}
    assert keys == {"data.batch_size", "data.resize_hw", "train.lr", "data.num_pairs"}


def test_runs_already_recorded_are_skipped_and_new_ones_appended(sweep, tmp_path, monkeypatch, capsys):
    results = tmp_path / "sweep.jsonl"
    results.write_text(json.dumps(record("stage3_probe", "preset", 0)) + "\n")
    calls = []

    def fake_run(mode, label, key, value, seed, data_root):
        calls.append((mode, label, seed))
        return record(mode, label, seed, bad=("loss_decreases",) if label == "lr x3" else ())

    monkeypatch.setattr(sweep, "run_one", fake_run)
    assert sweep.main([str(results), "--modes", "stage3_probe", "--seeds", "0"]) == 0
    assert len(calls) == 8 and ("stage3_probe", "preset", 0) not in calls
    assert len(results.read_text().splitlines()) == 9
    out = capsys.readouterr().out
    assert "[8/8] stage3_probe 64 pairs seed 0" in out
    assert "stage3_probe: 9 healthy runs, 1 with a BAD signal" in out
    calls.clear()
    assert sweep.main([str(results), "--modes", "stage3_probe", "--seeds", "0"]) == 0
    assert calls == []  # everything recorded: nothing re-run


def test_summary_only_reads_the_file(sweep, tmp_path, monkeypatch, capsys):
    results = tmp_path / "sweep.jsonl"
    results.write_text(json.dumps(record("overfit_stage1", "preset", 0)) + "\n")
    monkeypatch.setattr(sweep, "run_one", lambda *a: pytest.fail("--summary must not run anything"))
    assert sweep.main([str(results), "--summary"]) == 0
    assert "overfit_stage1: 1 healthy runs, 0 with a BAD signal" in capsys.readouterr().out


def test_an_unknown_mode_is_refused(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(tmp_path / "x.jsonl"), "--modes", "stage9"])
    assert exit_info.value.code == 2 and "invalid choice: 'stage9'" in capsys.readouterr().err
    assert not Path(tmp_path / "x.jsonl").exists()


def test_photo_dataset_is_generated_from_other_photographs_at_a_non_square_size(sweep, tmp_path):
    import sys
    from PIL import Image
    import pandas as pd
    root = sweep.make_photo_dataset(tmp_path / "photos", pairs=4)
    inputs = sorted(root.glob("*_original.jpg"))
    assert len(inputs) == 4 and len(list(root.glob("*_generated.jpg"))) == 4
    for path in inputs:
        with Image.open(path) as image:
            assert image.size == (sweep.PHOTO_STORED_HW[1], sweep.PHOTO_STORED_HW[0])  # (W, H), not square
    truth = pd.read_csv(tmp_path / "photos" / "ground_truth.csv")
    assert len(truth) == 4 and set(truth["source"]) <= set(sweep.PHOTO_SOURCES)
    fixtures = sys.modules["make_fixture_dataset"]
    assert not set(sweep.PHOTO_SOURCES) & set(fixtures.SOURCES)  # photographs the fixtures do not use
    assert "brick" in fixtures.SOURCES  # and the generator's own sources are restored afterwards


def test_photo_sweep_runs_its_non_square_variations_on_a_temporary_dataset(sweep, tmp_path, monkeypatch, capsys):
    made, calls = [], []

    def fake_dataset(folder):
        made.append(folder)
        (folder / "pairs").mkdir(parents=True)
        return folder / "pairs"

    def fake_run(mode, label, key, value, seed, data_root):
        calls.append((label, key, value, data_root))
        return record(mode, label, seed)

    monkeypatch.setattr(sweep, "make_photo_dataset", fake_dataset)
    monkeypatch.setattr(sweep, "run_one", fake_run)
    results = tmp_path / "sweep.jsonl"
    assert sweep.main([str(results), "--dataset", "photos", "--modes", "stage2_probe", "--seeds", "0"]) == 0
    sizes = [value if key else value["data.resize_hw"] for _, key, value, _ in calls]
    assert len(calls) == 3 and all(h != w for h, w in sizes)
    assert calls[2][1:3] == (None, {"data.resize_hw": [112, 160], "data.batch_size": 4})
    assert {root for *_, root in calls} == {str(made[0] / "pairs")} and not made[0].exists()  # removed after
    assert all(json.loads(line)["dataset"] == "photos" for line in results.read_text().splitlines())
    assert "stage2_probe [photos]: 3 healthy runs, 0 with a BAD signal" in capsys.readouterr().out
    calls.clear()
    assert sweep.main([str(results), "--dataset", "photos", "--modes", "stage2_probe", "--seeds", "0"]) == 0
    assert calls == [] and len(made) == 1  # all recorded: no dataset generated, nothing re-run


def test_medium_runs_span_the_minimum_evidence_of_the_overfit_signals(sweep, tmp_path, monkeypatch):
    """--medium-runs: 2 to 12 epochs of 4 steps (8-48 steps), across loss_decreases' 3 and the overfit
    signals' 12 epochs, each at every seed."""
    from autohdr.diagnosis.verdicts import LOSS_MIN_EPOCHS, OVERFIT_MIN_EPOCHS
    epochs = [value["train.epochs"] for _, _, value in sweep.MEDIUM_RUNS]
    assert min(epochs) < LOSS_MIN_EPOCHS <= OVERFIT_MIN_EPOCHS <= max(epochs)
    assert all(value["data.num_pairs"] // value["data.batch_size"] == 4 for _, _, value in sweep.MEDIUM_RUNS)
    calls = []
    monkeypatch.setattr(sweep, "run_one", lambda mode, label, key, value, seed, root: calls.append((label, seed)) or {
        "mode": mode, "variation": label, "seed": seed, "all_good": True, "verdicts": {}, "loss_relative_drop": None,
        "wall_s": 0.0})
    assert sweep.main([str(tmp_path / "r.jsonl"), "--modes", "overfit_stage1", "--medium-runs", "--seeds", "0", "1"]) == 0
    assert calls == [(label, seed) for label, _, _ in sweep.MEDIUM_RUNS for seed in (0, 1)]
