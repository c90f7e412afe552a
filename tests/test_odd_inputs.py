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
    from autohdr.runs.debug import resolve_preset
    preset = resolve_preset("stage2_probe", [setting], environ={})
    key, text = setting.split("=")
    section, name = key.split(".")
    value = getattr(getattr(preset, section), name)
    assert value is not None and str(value).lower() not in ("inf", "nan")


def test_a_preset_file_with_inf_is_refused_by_name(tmp_path):
    from autohdr.runs.presets import load_preset
    preset = tmp_path / "mine.toml"
    base = (Path(__file__).resolve().parent.parent / "autohdr" / "runs" / "presets" / "stage2_probe.toml")
    assert "\nlr = 3e-3" in base.read_text(encoding="utf-8")
    preset.write_text(base.read_text(encoding="utf-8").replace("\nlr = 3e-3", "\nlr = inf", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.lr: expected a finite float, got inf"):
        load_preset(preset)
    with pytest.raises(ValueError, match=r"train\.lr: expected a finite float, got nan"):
        from autohdr.runs.debug import resolve_preset
        resolve_preset("stage2_probe", {"train.lr": float("nan")}, environ={})


# ---------------------------------------------------------------------------- EXIF orientation

import warnings  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from autohdr.data import DataError, DataNotice, PairDataset, load_image, scan_pairs, validate_pairs  # noqa: E402
from tests.helpers_data import gradient_rgb  # noqa: E402

ORIENTATION = 0x0112


def _save(array: np.ndarray, path: Path, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if orientation is None:
        image.save(path, quality=95)
    else:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        image.save(path, quality=95, exif=exif)
    return path


def _stored_turned(upright: np.ndarray) -> np.ndarray:
    """The pixels a camera stores for ``upright`` with EXIF orientation 6 (shown after a 270-degree turn)."""
    return np.ascontiguousarray(np.rot90(upright, k=1))  # 90 degrees counter-clockwise


def _write_turned_pair(folder: Path, image_id: str, hw: tuple[int, int], input_tag: int = 6,
                       rotate_input: bool = True) -> Path:
    upright = gradient_rgb(*hw, seed=3)
    stored = _stored_turned(upright) if rotate_input else upright
    _save(stored, folder / f"{image_id}_original.jpg", orientation=input_tag)
    _save(upright, folder / f"{image_id}_generated.jpg")
    return folder


class TestExifOrientation:
    @pytest.mark.parametrize("hw", [(48, 48), (48, 80)], ids=["square", "landscape"])
    def test_an_input_stored_turned_with_its_tag_loads_upright_like_its_target(self, tmp_path, hw):
        folder = _write_turned_pair(tmp_path, "cam01", hw)
        stored = np.asarray(Image.open(folder / "cam01_original.jpg"), dtype=np.float32) / 255
        target = load_image(folder / "cam01_generated.jpg").numpy()
        loaded = load_image(folder / "cam01_original.jpg").numpy()
        assert loaded.shape == target.shape == (3, *hw)
        assert np.abs(loaded - target).mean() < 0.02                      # upright: the same picture
        if hw[0] == hw[1]:  # the bug: read as stored, a square input is its target turned by 90 degrees
            assert np.abs(stored.transpose(2, 0, 1) - target).mean() > 0.1
        rows = scan_pairs(folder)
        with pytest.warns(DataNotice, match=r"cam01 \(input 6, target 1\)"):  # accepted, and named
            assert validate_pairs(rows) == 1
        sample = PairDataset(rows, resize_hw=(32, 32))[0]
        assert np.abs(sample["input_image"].numpy() - sample["target_image"].numpy()).mean() < 0.03

    def test_pairs_with_the_same_orientation_give_no_notice(self, tmp_path):
        upright = gradient_rgb(48, 64, seed=1)
        _save(_stored_turned(upright), tmp_path / "a_original.jpg", orientation=6)
        _save(_stored_turned(upright), tmp_path / "a_generated.jpg", orientation=6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert validate_pairs(scan_pairs(tmp_path)) == 1

    def test_a_wrong_tag_that_breaks_the_sizes_says_so(self, tmp_path):
        """Input tagged as turned but stored upright (non-square): refused, naming EXIF and both tags."""
        folder = _write_turned_pair(tmp_path, "cam02", (48, 80), rotate_input=False)
        with pytest.raises(DataError) as info:
            validate_pairs(scan_pairs(folder))
        message = str(info.value)
        assert "cam02_original.jpg (48x80)" in message and "cam02_generated.jpg (80x48)" in message
        assert "EXIF orientation 6" in message and "as stored they would match" in message


# ---------------------------------------------------------------------------- image size limits

class TestImageSize:
    @pytest.mark.parametrize("hw", [(1, 1), (3, 4000), (15, 64)], ids=["1x1", "4000x3", "64x15"])
    def test_an_image_below_the_minimum_is_refused_by_name(self, tmp_path, hw):
        _save(gradient_rgb(*hw), tmp_path / "tiny_original.jpg")
        _save(gradient_rgb(*hw), tmp_path / "tiny_generated.jpg")
        rows = scan_pairs(tmp_path)
        with pytest.raises(DataError, match=rf"tiny_original.jpg is {hw[1]}x{hw[0]} pixels: images must be at "
                                            r"least 16x16"):
            validate_pairs(rows)
        with pytest.raises(DataError, match="tiny_original.jpg"):
            PairDataset(rows)[0]

    def test_an_image_at_the_minimum_is_accepted(self, tmp_path):
        _save(gradient_rgb(16, 16), tmp_path / "ok_original.jpg")
        _save(gradient_rgb(16, 16), tmp_path / "ok_generated.jpg")
        rows = scan_pairs(tmp_path)
        assert validate_pairs(rows) == 1 and PairDataset(rows)[0]["input_image"].shape == (3, 16, 16)

    def test_pillow_size_warnings_become_one_notice_and_the_limit_is_a_setting(self, tmp_path, monkeypatch):
        """Scaled down (a 10000x10000 photo takes a 300 MB decode): Pillow's own limit is set to 1000 pixels
        and autohdr's (AUTOHDR_MAX_IMAGE_PIXELS) to 3000: a 40x40 image (1600) is above half of it."""
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        monkeypatch.setenv("AUTOHDR_MAX_IMAGE_PIXELS", "3000")
        _save(gradient_rgb(40, 40), tmp_path / "big_original.jpg")
        _save(gradient_rgb(40, 40), tmp_path / "big_generated.jpg")
        rows = scan_pairs(tmp_path)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            validate_pairs(rows)
            PairDataset(rows, resize_hw=(32, 32))[0]
        assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
        notices = [str(w.message) for w in seen if issubclass(w.category, DataNotice)]
        assert len(notices) == 2 and "big_original.jpg is 40x40 = 0.0 megapixels, a very large image" in notices[0]
        assert "AUTOHDR_MAX_IMAGE_PIXELS" in notices[0]
        assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's setting is left as it was

    def test_an_image_above_the_limit_is_refused_naming_the_setting(self, tmp_path, monkeypatch):
        monkeypatch.setenv("AUTOHDR_MAX_IMAGE_PIXELS", "1000")
        _save(gradient_rgb(40, 40), tmp_path / "huge_original.jpg")
        _save(gradient_rgb(40, 40), tmp_path / "huge_generated.jpg")
        rows = scan_pairs(tmp_path)
        with pytest.raises(DataError, match=r"huge_original.jpg is 40x40 = 0.0 megapixels, above the limit of "
                                            r"0.0 MP: set AUTOHDR_MAX_IMAGE_PIXELS=1600 \(or 'none'\)"):
            validate_pairs(rows)
        monkeypatch.setenv("AUTOHDR_MAX_IMAGE_PIXELS", "1600")
        with pytest.warns(DataNotice):
            assert validate_pairs(rows) == 1
        monkeypatch.setenv("AUTOHDR_MAX_IMAGE_PIXELS", "lots")
        with pytest.raises(ValueError, match="AUTOHDR_MAX_IMAGE_PIXELS='lots' is not valid"):
            validate_pairs(rows)

    def test_a_large_image_is_one_notice_line_in_the_command(self, tmp_path, monkeypatch, capsys):
        data = copy_pairs(default_fixture_root(), tmp_path / "pairs", 4)
        first = sorted(data.glob("*_original.*"))[0]
        width, height = Image.open(first).size
        monkeypatch.setenv("AUTOHDR_MAX_IMAGE_PIXELS", str(int(width * height * 1.5)))
        code, out, err = _debug(capsys, "stage2_probe", "--data-root", str(data), "--out", str(tmp_path / "run"),
                                "--set", "data.num_pairs=4", *TINY_RUN)
        assert code in (cli.EXIT_OK, cli.EXIT_BAD_SIGNAL), err
        lines = [line for line in err.splitlines() if "very large image" in line]
        assert len(lines) == 8 and all(line.startswith("autohdr: notice: image file ") for line in lines)
        assert "DecompressionBomb" not in err


# ---------------------------------------------------------------------------- broken links, checkpoints, models

class TestBrokenLinks:
    def test_broken_and_looping_symlinks_are_named(self, tmp_path):
        data = copy_pairs(default_fixture_root(), tmp_path / "pairs", 2)
        (data / "gone_original.jpg").symlink_to(tmp_path / "nowhere" / "x.jpg")
        (data / "gone_generated.jpg").symlink_to(next(data.glob("*_generated.jpg")))
        (data / "loop_generated.jpg").symlink_to(data / "loop_generated.jpg")
        with pytest.raises(DataError) as info:
            scan_pairs(data)
        message = str(info.value)
        assert "2 image link(s) lead to no file" in message
        assert f"gone_original.jpg -> {tmp_path / 'nowhere' / 'x.jpg'} (its target does not exist)" in message
        assert "loop_generated.jpg -> " in message and "(a symlink loop)" in message
        assert "without an input" not in message

    def test_a_symlink_to_an_image_is_a_pair_like_any_other(self, tmp_path):
        data = copy_pairs(default_fixture_root(), tmp_path / "pairs", 1)
        (tmp_path / "linked").mkdir()
        for file in data.iterdir():
            (tmp_path / "linked" / file.name).symlink_to(file)
        assert len(scan_pairs(tmp_path / "linked")) == 1


class TestCheckpointErrors:
    def _refusal(self, tmp_path, capsys, checkpoint: Path) -> str:
        code, out, err = _debug(capsys, "stage2_probe", "--out", str(tmp_path / "run"), "--init-from",
                                str(checkpoint), *TINY_RUN, "--set", "data.num_pairs=4")
        assert code == cli.EXIT_USAGE, (out, err)
        (line,) = err.strip().splitlines()
        assert line.startswith(f"autohdr: error: checkpoint {checkpoint} could not be read: ")
        assert "weights_only" not in line and "False" not in line and "trusted source" not in line
        return line

    def test_a_pickle_of_arbitrary_objects_is_refused_without_the_unsafe_advice(self, tmp_path, capsys):
        import fractions
        import torch
        bad = tmp_path / "other.pt"
        torch.save({"model": {"w": fractions.Fraction(1, 3)}}, bad)
        line = self._refusal(tmp_path, capsys, bad)
        assert "a Python object of type fractions.Fraction" in line and "never runs code" in line

    @pytest.mark.parametrize("content", [b"hello, not a checkpoint", b"\x80\x04K\x01."], ids=["text", "pickle"])
    def test_a_file_that_is_no_checkpoint_is_named(self, tmp_path, capsys, content):
        bad = tmp_path / "notes.pt"
        bad.write_bytes(content)
        self._refusal(tmp_path, capsys, bad)

    def test_a_broken_link_as_checkpoint_is_named(self, tmp_path, capsys):
        link = tmp_path / "best.pt"
        link.symlink_to(tmp_path / "moved" / "best.pt")
        code, out, err = _debug(capsys, "stage2_probe", "--out", str(tmp_path / "run"), "--init-from", str(link),
                                *TINY_RUN)
        assert code == cli.EXIT_USAGE
        assert err.strip() == f"autohdr: error: checkpoint {link} is a broken symlink (to {tmp_path / 'moved' / 'best.pt'})"


def wrong_output_key():
    """``--model-factory``: a model whose forward returns ``{"parameters": ...}`` instead of ``{"params": ...}``."""
    import torch

    class WrongKey(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3, 8)

        def forward(self, image):
            return {"parameters": self.head(image.mean(dim=(2, 3))), "flow": None}

    return WrongKey()


def test_a_model_with_a_wrong_output_key_is_named(tmp_path, capsys):
    args = ["stage2_probe", "--out", str(tmp_path / "run"), *TINY_RUN, "--set", "data.num_pairs=4"]
    args[args.index("tests.cli_factories:small_model")] = "tests.test_odd_inputs:wrong_output_key"
    code, out, err = _debug(capsys, *args)
    assert code == cli.EXIT_USAGE, (out, err)
    line = err.strip().splitlines()[-1]  # after the notices on its unnamed parameter groups
    assert line.startswith("autohdr: error: ") and "Traceback" not in err
    assert "must return a dict with 'params'" in line
    assert "got a dict with 'parameters', 'flow' but no 'params'" in line and "WrongKey" in line


# ---------------------------------------------------------------------------- data-range errors name the sample

def _batch(values: list[float], ids=("a", "b"), paths=True) -> dict:
    import torch
    image = torch.stack([torch.full((3, 4, 4), v) for v in values])
    batch = {"input_image": image, "target_image": image.clamp(0, 1), "image_id": list(ids)}
    if paths:
        batch["input_path"] = [f"/data/{i}_original.jpg" for i in ids]
    return batch


class TestBatchRange:
    def test_a_batch_in_range_passes(self):
        from autohdr.data.dataset import batch_range_problem
        assert batch_range_problem(_batch([0.0, 1.0]), "validation batch 0") is None
        assert batch_range_problem(_batch([1.0005, -0.0005]), "validation batch 0") is None  # float rounding

    def test_a_sample_in_0_255_is_named_with_its_file(self):
        from autohdr.data.dataset import batch_range_problem
        line = batch_range_problem(_batch([0.5, 164.0]), "validation batch 3")
        assert line == ("validation batch 3, sample 1 (b, /data/b_original.jpg): input values in [164, 164], "
                        "expected [0, 1] (images in 0-255? divide by 255)")

    def test_a_nan_without_ids_is_named_by_position(self):
        from autohdr.data.dataset import batch_range_problem
        batch = _batch([0.5, float("nan")], paths=False)
        del batch["image_id"]
        assert batch_range_problem(batch, "validation batch 0") == (
            "validation batch 0, sample 1: input holds non-finite values (NaN or inf)")

    @pytest.mark.parametrize("bad_batch", [0, 2], ids=["in-the-probe", "after-the-probe"])
    def test_a_run_whose_validation_inputs_are_0_255_names_batch_sample_and_file(self, tmp_path, bad_batch):
        """The reported case: inputs in 0-255 read "pred must have values in [0, 1]"; now the batch,
        the sample and its file are named (the probe holds the first 4 samples: batches 0 and 1)."""
        from autohdr.runs.debug import build_loaders, run_debug_mode, select_rows
        from autohdr.runs.presets import load_preset
        from tests.cli_factories import small_model
        overrides = {"data.num_pairs": 6, "data.batch_size": 2, "data.resize_hw": [64, 64]}
        preset = load_preset("stage2_probe", overrides)
        train_rows, val_rows = select_rows(default_fixture_root(), preset.data)
        train_loader, val_loader = build_loaders(train_rows, val_rows, preset.data, 0)

        class ScaledBatch:  # one validation batch in 0..255 (a forgotten division on one path)
            def __len__(self):
                return len(val_loader)

            def __iter__(self):
                for index, batch in enumerate(val_loader):
                    yield {**batch, "input_image": batch["input_image"] * 255.0} if index == bad_batch else batch

        with pytest.raises(DataError) as info:
            run_debug_mode("stage2_probe", model=small_model(), train_loader=train_loader, val_loader=ScaledBatch(),
                           out_dir=tmp_path / "run", device="cpu", overrides=overrides, epochs=1, plots=False)
        message = str(info.value)
        sample_id = val_rows["image_id"].iloc[2 * bad_batch]
        assert message.startswith(f"validation batch {bad_batch}")
        assert f"sample 0 ({sample_id}, " in message and f"{sample_id}_original" in message
        assert "divide by 255" in message and "pred" not in message


# ---------------------------------------------------------------------------- a custom model without a residual

RESIDUAL_JUDGED = ("residual_contributes", "residual_head_learning", "residual_not_inactive",
                   "eval_residual_matches_train", "residual_helps")


def _residual_history(returns_flow: bool):
    """Healthy stage-2 records of a model whose residual contributes nothing (0 px) and whose
    ``residual_head`` group is empty: with ``returns_flow`` a parameter-free residual module (a fault),
    without it a model that returns only ``params``."""
    import pandas as pd
    from tests.test_verdicts import healthy_records
    records = healthy_records("stage2_hybrid")
    records[0]["parameter_groups"] = {"residual_head": {"tensors": 0, "values": 0, "measured": False}}
    for record in records:
        if record["kind"] == "train_step":
            record.update(residual_contrib_px_mean=0.0, residual_to_param_disp_ratio_mean=0.0)
            for key in ("grad_norm_residual_head", "param_delta_residual_head"):
                record.pop(key, None)
            if returns_flow:
                record["residual_flow_abs_mean_px"] = 0.0
            else:
                record.pop("residual_flow_abs_mean_px", None)
    return pd.DataFrame.from_records(records)


@pytest.mark.parametrize("returns_flow", [False, True], ids=["params-only-model", "parameter-free-residual-head"])
def test_a_model_without_residual_output_is_not_judged_on_it(returns_flow):
    from autohdr.diagnosis.causes import diagnose
    from autohdr.diagnosis.verdicts import judge
    history = _residual_history(returns_flow)
    verdicts = {v.signal: v for v in judge(history)}
    causes = [d.cause_id for d in diagnose(list(verdicts.values()), history)]
    if returns_flow:  # the fault: a residual module that can never learn is still BAD, with its cause
        assert verdicts["residual_contributes"].ok is False and "frozen_residual_head" in causes
    else:
        assert all(verdicts[name].ok is None for name in RESIDUAL_JUDGED)
        assert "no residual flow" in verdicts["residual_contributes"].detail
        assert "frozen_residual_head" not in causes and not [v for v in verdicts.values() if v.ok is False]


def test_a_run_of_a_params_only_model_has_no_residual_bad(tmp_path):
    from autohdr.runs.debug import run_debug_mode
    from tests.helpers_trainer import GlobalParamsOnly
    report = run_debug_mode("stage2_probe", model=GlobalParamsOnly(), out_dir=tmp_path / "run", device="cpu",
                            overrides={"data.num_pairs": 8, "data.batch_size": 2, "data.resize_hw": [64, 64],
                                       "judge.require_beats_constant_lens": False}, epochs=2, plots=False)
    by_name = {v["signal"]: v for v in report["verdicts"]}
    assert all(by_name[name]["ok"] is None for name in RESIDUAL_JUDGED)
    assert "frozen_residual_head" not in [d["cause_id"] for d in report["diagnoses"]]


# ---------------------------------------------------------------------------- pytest --data-root on your data

def _user_like_dataset(root: Path) -> Path:
    """11 pairs in the documented layout that look nothing like the fixtures: other ids (no ``p000``),
    extensions in other cases, stored sizes from 17x40 to 120x40, portrait and landscape."""
    from tests.helpers_data import save
    specs = [("IMG_0042", (48, 64), ".JPG"), ("IMG_0107", (64, 48), ".jpg"), ("shoot-a_g0", (40, 120), ".png"),
             ("shoot-a_g1", (40, 120), ".png"), ("Beach Day (2)", (96, 96), ".jpeg"), ("x9", (17, 40), ".jpg"),
             ("zz_last", (72, 30), ".JPEG"), ("été_01", (50, 50), ".jpg"), ("0001", (32, 80), ".jpg"),
             ("A-b.c", (80, 32), ".png"), ("m_7", (60, 45), ".jpg")]
    for index, (image_id, (h, w), ext) in enumerate(specs):
        save(gradient_rgb(h, w, seed=index), root / f"{image_id}_original{ext}")
        save(gradient_rgb(h, w, seed=index + 50), root / f"{image_id}_generated{ext}")
    return root


def test_pytest_data_root_runs_the_data_tests_on_any_dataset_in_the_layout(tmp_path):
    """The documented command, ``pytest --data-root=DIR -m data_root``, on a dataset with other names,
    sizes and aspect ratios: every test that reads the data root passes (none assumes the fixtures'
    ``p000`` ids, count or 256x256 size). The overfit mode on the data is left out here (it trains for a
    minute and these gradient images hold no lens to learn); its skip without a data root is checked."""
    import subprocess
    import sys
    from tests.helpers_data import REPO_ROOT
    data = _user_like_dataset(tmp_path / "my pairs")
    files = ["tests/test_data.py", "tests/test_overfit_split_script.py", "tests/test_splits.py"]
    command = [sys.executable, "-m", "pytest", f"--data-root={data}", "-m", "data_root", "-p", "no:cacheprovider",
               "-p", "no:xdist", "-q", "-rs", "-k", "not overfit_mode_on_your_data", *files]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 11 and "failed" not in summary and "error" not in summary, summary
    assert "skipped" not in summary, result.stdout[-2000:]  # 11 pairs: even the seeded-shuffle test runs

    # Without a data root of one's own, the overfit mode's test skips saying what to pass (called
    # directly with a config that has none: a second pytest process only to see one skip cost ~5 s).
    from tests import test_data
    from tests.plugins.data_fixtures import _USER_DATA_ROOT

    class ConfigWithoutADataRoot:
        stash = {_USER_DATA_ROOT: ""}

        @staticmethod
        def getoption(name):
            return None

    with pytest.raises(pytest.skip.Exception, match=r"runs on your data only: pass --data-root=DIR"):
        test_data.test_the_overfit_mode_on_your_data_is_all_good(None, ConfigWithoutADataRoot(), tmp_path, None)
