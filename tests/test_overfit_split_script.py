"""scripts/debug_prepare_overfit_split.py, run as a user would (a subprocess from the repo root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from autohdr.data import read_split_csv, scan_pairs
from tests.helpers_data import REPO_ROOT, copy_pairs
from tests.plugins.data_fixtures import hash_tree

SCRIPT = REPO_ROOT / "scripts" / "debug_prepare_overfit_split.py"
REPORT_KEYS = {"data_root", "num_pairs_requested", "num_pairs_written", "seed", "shuffle", "train_split", "val_split"}


def run_script(*args, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _ids(root: Path) -> list[str]:
    """Every pair id of ``root`` in the order autohdr lists them (by id): any dataset in the layout."""
    return scan_pairs(root).image_id.tolist()


def test_first_n_pairs_train_equals_val(immutable_data_root, tmp_path):
    ids = _ids(immutable_data_root)
    count = min(8, len(ids))
    result = run_script("--data-root", immutable_data_root, "--out-dir", tmp_path / "out", "--num-pairs", count)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    train, val = read_split_csv(out / "train_split.csv"), read_split_csv(out / "val_split.csv")
    pd.testing.assert_frame_equal(train, val)
    assert train.image_id.tolist() == ids[:count]
    report = json.loads((out / "overfit_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert (report["num_pairs_requested"], report["num_pairs_written"], report["seed"], report["shuffle"]) == (
        count, count, 123, False)
    assert Path(report["data_root"]) == immutable_data_root.absolute()
    assert Path(report["train_split"]) == out / "train_split.csv" and Path(report["val_split"]) == out / "val_split.csv"
    assert "note" not in result.stdout


def test_shuffle_is_seeded(immutable_data_root, tmp_path):
    available = _ids(immutable_data_root)
    if len(available) < 10:
        pytest.skip(f"needs >= 10 pairs to tell seeded draws of 8 apart, {immutable_data_root} has {len(available)}")
    ids = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        result = run_script("--data-root", immutable_data_root, "--out-dir", tmp_path / name, "--num-pairs", 8,
                            "--seed", seed, "--shuffle")
        assert result.returncode == 0, result.stderr
        ids[name] = read_split_csv(tmp_path / name / "train_split.csv").image_id.tolist()
        assert json.loads((tmp_path / name / "overfit_report.json").read_text())["shuffle"] is True
    assert ids["a"] == ids["b"] != ids["c"]
    assert ids["a"] != available[:8] and len(set(ids["a"])) == 8 and set(ids["a"]) <= set(available)


def test_more_pairs_than_exist(immutable_data_root, tmp_path):
    available = len(_ids(immutable_data_root))
    result = run_script("--data-root", immutable_data_root, "--out-dir", tmp_path, "--num-pairs", available + 100)
    assert result.returncode == 0, result.stderr
    assert f"note: requested {available + 100} pairs but only {available} exist" in result.stdout
    report = json.loads((tmp_path / "overfit_report.json").read_text())
    assert report["num_pairs_written"] == available == len(read_split_csv(tmp_path / "val_split.csv"))


@pytest.mark.parametrize("count", ["0", "-3"])
def test_non_positive_count(immutable_data_root, tmp_path, count):
    result = run_script("--data-root", immutable_data_root, "--out-dir", tmp_path / "out", f"--num-pairs={count}")
    assert_one_line_error(result, "must be >= 1", count)
    assert not (tmp_path / "out").exists()


def test_missing_root(tmp_path):
    result = run_script("--data-root", tmp_path / "absent", "--out-dir", tmp_path / "out")
    assert_one_line_error(result, str(tmp_path / "absent"), "does not exist")


def test_root_without_pairs(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script("--data-root", tmp_path / "empty", "--out-dir", tmp_path / "out")
    assert_one_line_error(result, "no pairs found", str(tmp_path / "empty"))


def test_refuses_out_dir_inside_data_root(fixture_root, tmp_path):
    root = copy_pairs(fixture_root, tmp_path / "data", 3)
    before = hash_tree(root)
    result = run_script("--data-root", root, "--out-dir", root / "splits")
    assert_one_line_error(result, "inside the data root", "immutable")
    assert hash_tree(root) == before


def test_runs_from_another_directory(immutable_data_root, tmp_path):
    result = run_script("--data-root", immutable_data_root, "--out-dir", "rel_out", "--num-pairs", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_split_csv(tmp_path / "rel_out" / "train_split.csv")) == 2
