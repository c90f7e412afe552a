"""Odd inputs a new user brings: each is used as it really is, or refused by name, never silently wrong.

Every case has its bad input (red: the notice or the refusal, naming the file, key or value) and a
good neighbour (green: no notice, accepted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autohdr import cli
from autohdr.data.settings import default_fixture_root
from tests.helpers_data import copy_pairs

#: A run small enough to show what it used: 64x64, batch 2, one epoch, the small model.
TINY_RUN = ["--device", "cpu", "--no-plots", "--epochs", "1", "--model-factory", "tests.cli_factories:small_model",
            "--set", "data.batch_size=2", "--set", "data.resize_hw=64x64",
            "--set", "judge.require_beats_constant_lens=false"]


def _debug(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["debug", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- pairs actually used

@pytest.fixture(scope="module")
def five_pairs(tmp_path_factory) -> Path:
    return copy_pairs(default_fixture_root(), tmp_path_factory.mktemp("five") / "pairs", 5)


class TestPairsUsed:
    def test_fewer_pairs_than_asked_are_used_with_a_notice_and_reported(self, five_pairs, tmp_path, capsys):
        run = tmp_path / "run"
        code, out, err = _debug(capsys, "overfit_stage1", "--data-root", str(five_pairs), "--out", str(run),
                                "--set", "data.num_pairs=8", *TINY_RUN)
        assert code in (cli.EXIT_OK, cli.EXIT_BAD_SIGNAL), err
        notice = [line for line in err.splitlines() if line.startswith("autohdr: notice: data.num_pairs=8")]
        assert notice == [f"autohdr: notice: data.num_pairs=8 asked, but 5 pair(s) found in {five_pairs}: the run "
                          f"uses 5 (report.json 'pairs' and report.html say so)"]
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        assert {k: report["pairs"][k] for k in ("asked", "found", "used", "train", "val")} == {
            "asked": 8, "found": 5, "used": 5, "train": 5, "val": 5}
        page = (run / "report.html").read_text(encoding="utf-8")
        assert "pairs: <strong>5</strong> used (train = val) of 8 asked, 5 found" in page
        assert 'id="pairs-note"' in page

    def test_as_many_pairs_as_asked_give_no_notice(self, five_pairs, tmp_path, capsys):
        run = tmp_path / "run"
        code, out, err = _debug(capsys, "stage2_probe", "--data-root", str(five_pairs), "--out", str(run),
                                "--set", "data.num_pairs=4", *TINY_RUN)
        assert code in (cli.EXIT_OK, cli.EXIT_BAD_SIGNAL), err
        assert "notice: data.num_pairs" not in err
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        pairs = report["pairs"]
        assert (pairs["asked"], pairs["found"], pairs["used"], pairs["note"]) == (4, 5, 4, None)
        assert pairs["train"] == 4 and pairs["val"] == (4 if pairs["overfit"] else 1)
        assert 'id="pairs-note"' not in (run / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- values refused by name

@pytest.mark.parametrize(("setting", "fragments"), [
    ("train.lr=inf", ["train.lr", "expected a finite float", "inf"]),
    ("train.lr=nan", ["train.lr", "expected a finite float", "nan"]),
    ("train.lr=-inf", ["train.lr", "expected a finite float"]),
    ("lr=1e999", ["train.lr", "expected a finite float"]),                 # overflows to inf
    ("train.grad_clip_norm=inf", ["train.grad_clip_norm", "finite"]),
    ("judge.beats_identity_margin=nan", ["judge.beats_identity_margin", "finite"]),
    ("train.loss_weights.pixel=inf", ["train.loss_weights.pixel", "finite"]),
    ("data.overfit=1", ["data.overfit", "expected true/false", "'1'"]),
    ("train.amp=0", ["train.amp", "expected true/false", "'0'"]),
    ("train.lr=1_000", ["train.lr", "'1_000'", "underscores are not accepted", "'1000'"]),
    ("data.num_pairs=1_6", ["data.num_pairs", "expected int", "underscores"]),
    ("data.resize_hw=6_4x64", ["data.resize_hw", "underscores"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_value_that_makes_no_sense_is_refused_by_name(setting, fragments, tmp_path, capsys):
    code, out, err = _debug(capsys, "stage2_probe", "--out", str(tmp_path / "run"), "--set", setting)
    assert code == cli.EXIT_USAGE
    (line,) = err.strip().splitlines()
    assert line.startswith("autohdr: error: ") and all(f in line for f in fragments), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["train.lr=1e-3", "train.lr=1000", "data.overfit=true", "data.overfit=no",
                                     "train.amp=off", "data.num_pairs=16", "train.grad_clip_norm=1e9",
                                     "data.resize_hw=64x64"])
def test_a_sensible_value_is_accepted(setting):
    from autohdr.diagnosis.debug import resolve_preset
    preset = resolve_preset("stage2_probe", [setting], environ={})
    key, text = setting.split("=")
    section, name = key.split(".")
    value = getattr(getattr(preset, section), name)
    assert value is not None and str(value).lower() not in ("inf", "nan")


def test_a_preset_file_with_inf_is_refused_by_name(tmp_path):
    from autohdr.diagnosis.presets import load_preset
    preset = tmp_path / "mine.toml"
    base = (Path(__file__).resolve().parent.parent / "autohdr" / "diagnosis" / "presets" / "stage2_probe.toml")
    assert "\nlr = 3e-3" in base.read_text(encoding="utf-8")
    preset.write_text(base.read_text(encoding="utf-8").replace("\nlr = 3e-3", "\nlr = inf", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.lr: expected a finite float, got inf"):
        load_preset(preset)
    with pytest.raises(ValueError, match=r"train\.lr: expected a finite float, got nan"):
        from autohdr.diagnosis.debug import resolve_preset
        resolve_preset("stage2_probe", {"train.lr": float("nan")}, environ={})
