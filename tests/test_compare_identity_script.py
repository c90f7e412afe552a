"""scripts/debug_compare_identity.py run as a user would (a subprocess), and autohdr.runs.compare in-process.

The checkpoint comes from one short real overfit run (8 fixture pairs, batch 4, 6 epochs = 12
steps), trained once per session through the ``debug_run`` plugin. Measured: after 2 epochs of
one step each the model does not beat identity yet (proxy total 0.5592 vs 0.5597); after these 12
steps its best checkpoint does (0.5778 vs 0.5597).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from autohdr.training.checkpoint import load_checkpoint
from autohdr.runs.compare import (
    SUMMARY_KEYS, checkpoint_stage, compare_identity, model_from_checkpoint, run_batch_size, run_resize_hw,
    score_delta,
)
from autohdr.data import PairDataset, make_loader, read_split_csv, write_split_csv
from autohdr.lens.evaluation import PROXY_KEYS, identity_prediction
from autohdr.lens.geometry import identity_params
from autohdr.lens.model import ModelConfig
from autohdr.runs.presets import load_preset
from autohdr.lens.proxy import proxy_score
from tests.helpers_data import REPO_ROOT, copy_pairs
from tests.plugins.data_fixtures import hash_tree
from tests.plugins.debug_runs import RunSpec

SCRIPT = REPO_ROOT / "scripts" / "debug_compare_identity.py"
OVERFIT = RunSpec("compare-identity-overfit-8pairs", "overfit_stage1", epochs=6,
                  overrides=(("data.num_pairs", 8), ("data.batch_size", 4)))
#: Score keys must match exactly up to summation order (float64 means of the same per-pair floats).
SAME_SCORE = {"rel": 1e-12, "abs": 1e-12}
#: Scores at another batch size: CPU conv kernels block the batch differently, predictions move by
#: ~1e-7 and a few Canny edge pixels flip; measured 1e-7 on the proxy total at batch 8 vs 4, so
#: 1e-4 bounds it with room while still catching any real difference (a wrong model: > 1e-2).
OTHER_BATCH_SCORE = {"rel": 0, "abs": 1e-4}


def run_script_process(*args) -> subprocess.CompletedProcess:
    """The script as a user runs it: a new Python process (one OpenMP thread: with pytest-xdist on
    few cores, oversubscribed torch threads crawl)."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@functools.lru_cache(maxsize=1)
def _script_module():
    spec = importlib.util.spec_from_file_location("debug_compare_identity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args) -> subprocess.CompletedProcess:
    """The script's ``main`` in this process, its exit code and output captured as a process's would
    be (a new process per call costs 3-4 s of torch import; TestAsAProcess covers that path)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = _script_module().main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess([str(SCRIPT), *argv], code, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, nothing on stdout, and one ``debug_compare_identity: error:`` line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("debug_compare_identity: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def identity_only_scores(rows: pd.DataFrame, resize_hw: tuple[int, int]) -> dict[str, float]:
    """Mean proxy scores of the identity warp, one pair at a time (``(1, 3, H, W)`` each)."""
    per_pair = []
    dataset = PairDataset(rows, resize_hw=resize_hw)
    for index in range(len(dataset)):
        sample = dataset[index]
        pred = identity_prediction(sample["input_image"].unsqueeze(0))[0]
        per_pair.append(proxy_score(pred, sample["target_image"]))
    return {key: float(np.mean([float(s[key]) for s in per_pair])) for key in PROXY_KEYS}


class IdentityModel(nn.Module):
    """Always predicts the identity warp: ``params (B, 8)``, no residual flow."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"params": identity_params(image.shape[0], device=image.device, dtype=image.dtype)}


@pytest.fixture(scope="module")
def overfit_run(debug_run):
    return debug_run(OVERFIT)


@pytest.fixture(scope="module")
def resize_hw(overfit_run) -> tuple[int, int]:
    return tuple(overfit_run.report["config"]["data"]["resize_hw"])


@pytest.fixture(scope="module")
def default_result(overfit_run, tmp_path_factory):
    """The script on the run's best.pt and val_split.csv with defaults, plus --json-out."""
    json_out = tmp_path_factory.mktemp("compare") / "summary.json"
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt",
                        "--split-csv", overfit_run.out_dir / "val_split.csv", "--device", "cpu",
                        "--json-out", json_out)
    assert result.returncode == 0, result.stderr
    return result, json.loads(result.stdout), json_out


@pytest.fixture(scope="module")
def small_loader(overfit_run, resize_hw):
    """The run's first 4 validation pairs in batches of 2 (``(2, 3, H, W)`` images)."""
    rows = read_split_csv(overfit_run.out_dir / "val_split.csv").iloc[:4]
    return make_loader(PairDataset(rows, resize_hw=resize_hw), batch_size=2, shuffle=False)


# ------------------------------------------------------------------------------ the script's output

class TestSummary:
    def test_schema(self, default_result):
        _, summary, _ = default_result
        assert list(summary) == ["stage", *SUMMARY_KEYS]
        assert isinstance(summary["sample_count"], int)
        for name in ("identity", "model", "delta_model_minus_identity"):
            assert list(summary[name]) == list(PROXY_KEYS), name
            assert all(isinstance(v, float) for v in summary[name].values()), name

    def test_scores_are_fractions(self, default_result):
        _, summary, _ = default_result
        for name in ("identity", "model"):
            assert all(0.0 <= v <= 1.0 for v in summary[name].values()), summary[name]

    def test_covers_the_whole_split(self, default_result, overfit_run):
        _, summary, _ = default_result
        assert summary["sample_count"] == len(read_split_csv(overfit_run.out_dir / "val_split.csv"))

    def test_delta_is_model_minus_identity(self, default_result):
        _, summary, _ = default_result
        delta = summary["delta_model_minus_identity"]
        for key in PROXY_KEYS:
            assert delta[key] == pytest.approx(summary["model"][key] - summary["identity"][key], **SAME_SCORE), key

    def test_stage_defaults_to_the_checkpoints(self, default_result, overfit_run):
        _, summary, _ = default_result
        assert summary["stage"] == overfit_run.report["stage"] == "stage1_param_only"

    def test_identity_equals_identity_only_computation(self, default_result, overfit_run, resize_hw):
        _, summary, _ = default_result
        expected = identity_only_scores(read_split_csv(overfit_run.out_dir / "val_split.csv"), resize_hw)
        assert summary["identity"] == pytest.approx(expected, **SAME_SCORE)

    def test_matches_the_trainers_validation_of_the_best_epoch(self, default_result, overfit_run):
        """Same subset, same resolution: the numbers the trainer logged for best.pt's epoch."""
        _, summary, _ = default_result
        val = overfit_run.history[overfit_run.history["kind"] == "val_epoch"]
        best = val[val["is_best"] == True].iloc[-1]  # noqa: E712 (a pandas column)
        for key in PROXY_KEYS:
            assert summary["model"][key] == pytest.approx(float(best[f"val_proxy_{key}"]), **SAME_SCORE), key
            assert summary["identity"][key] == pytest.approx(float(best[f"identity_proxy_{key}"]), **SAME_SCORE), key

    def test_another_batch_size_agrees_up_to_kernel_noise(self, overfit_run):
        """The cause of the sixth-digit differences some machines showed: batch 8 vs the run's 4."""
        assert overfit_run.report["config"]["data"]["batch_size"] != 8
        result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                            overfit_run.out_dir / "val_split.csv", "--device", "cpu", "--batch-size", 8)
        assert result.returncode == 0, result.stderr
        model = json.loads(result.stdout)["model"]
        val = overfit_run.history[overfit_run.history["kind"] == "val_epoch"]
        best = val[val["is_best"] == True].iloc[-1]  # noqa: E712 (a pandas column)
        for key in PROXY_KEYS:
            assert model[key] == pytest.approx(float(best[f"val_proxy_{key}"]), **OTHER_BATCH_SCORE), key

    def test_trained_model_beats_identity(self, default_result, overfit_run):
        _, summary, _ = default_result
        margin = overfit_run.report["config"]["judge"]["beats_identity_margin"]
        assert summary["delta_model_minus_identity"]["total"] > margin, summary

    def test_json_out_writes_the_same_json(self, default_result):
        result, summary, json_out = default_result
        assert json.loads(json_out.read_text(encoding="utf-8")) == summary == json.loads(result.stdout)

    def test_progress_goes_to_stderr(self, default_result, overfit_run):
        result, summary, _ = default_result
        batch_size = overfit_run.report["config"]["data"]["batch_size"]  # the default: the run's
        batches = -(-summary["sample_count"] // batch_size)
        assert result.stderr.strip().splitlines()[-1] == f"debug_compare_identity: batch {batches}/{batches}"


def test_max_batches_limits_sample_count(overfit_run, resize_hw):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", "--device", "cpu", "--max-batches", 1,
                        "--batch-size", 3)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sample_count"] == 3
    rows = read_split_csv(overfit_run.out_dir / "val_split.csv").iloc[:3]
    assert summary["identity"] == pytest.approx(identity_only_scores(rows, resize_hw), **SAME_SCORE)


def test_stage_override_on_a_stage1_checkpoint(overfit_run, default_result):
    """Stage 1 never trains the residual head (zero-initialized), so fusing its flow changes nothing."""
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", "--device", "cpu", "--stage", "stage2_hybrid")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["stage"] == "stage2_hybrid"
    assert summary["model"] == pytest.approx(default_result[1]["model"], **SAME_SCORE)


def test_never_writes_under_the_data_folder(overfit_run, fixture_root, tmp_path):
    data = copy_pairs(fixture_root, tmp_path / "data", 3)
    csv = write_split_csv(pd.DataFrame({"image_id": ["p000", "p001", "p002"],
                                        "input_path": [str(data / f"p00{i}_original.jpg") for i in range(3)],
                                        "target_path": [str(data / f"p00{i}_generated.jpg") for i in range(3)]}),
                          tmp_path / "split.csv")
    before = hash_tree(data)
    ok = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv", csv, "--device", "cpu",
                    "--json-out", tmp_path / "out" / "summary.json")
    refused = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv", csv, "--device", "cpu",
                         "--json-out", data / "summary.json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sample_count"] == 3
    assert_one_line_error(refused, str(data / "summary.json"), "inside the data folder", "immutable")
    assert hash_tree(data) == before


# ------------------------------------------------------------------------------------ bad input

class TestAsAProcess:
    """The script as a user runs it, in a new process: the same summary as in-process, and the same
    one-line error."""

    def test_same_summary_as_in_process(self, overfit_run, default_result):
        result = run_script_process("--checkpoint", overfit_run.out_dir / "best.pt",
                                    "--split-csv", overfit_run.out_dir / "val_split.csv", "--device", "cpu")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == default_result[1]

    def test_one_line_error(self, overfit_run, tmp_path):
        result = run_script_process("--checkpoint", tmp_path / "absent.pt",
                                    "--split-csv", overfit_run.out_dir / "val_split.csv")
        assert_one_line_error(result, str(tmp_path / "absent.pt"), "does not exist")


def test_missing_checkpoint(overfit_run, tmp_path):
    result = run_script("--checkpoint", tmp_path / "absent.pt", "--split-csv", overfit_run.out_dir / "val_split.csv")
    assert_one_line_error(result, str(tmp_path / "absent.pt"), "does not exist")


def test_unreadable_checkpoint(overfit_run):
    result = run_script("--checkpoint", overfit_run.out_dir / "val_split.csv",
                        "--split-csv", overfit_run.out_dir / "val_split.csv")
    assert_one_line_error(result, str(overfit_run.out_dir / "val_split.csv"), "could not be read")


def test_missing_split_csv(overfit_run, tmp_path):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv", tmp_path / "absent.csv")
    assert_one_line_error(result, str(tmp_path / "absent.csv"), "does not exist")


def test_malformed_split_csv(overfit_run, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("image_id,input_path\np000,x.jpg\n", encoding="utf-8")
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv", csv)
    assert_one_line_error(result, str(csv), "missing column", "target_path")


@pytest.mark.parametrize(("value", "expected"), [
    ("abc", "two integers"), ("128", "two integers"), ("8,8", ">= 16"), ("100,100", "divisible by 16"),
])
def test_bad_resize_hw(overfit_run, value, expected):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", "--device", "cpu", "--resize-hw", value)
    assert_one_line_error(result, "--resize-hw", expected, value.split(",")[0])


@pytest.mark.parametrize("value", ["0", "-2"])
def test_non_positive_max_batches(overfit_run, value):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", f"--max-batches={value}")
    assert_one_line_error(result, "--max-batches", ">= 1", value)


def test_non_integer_max_batches(overfit_run):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", "--max-batches", "two")
    assert_one_line_error(result, "--max-batches", "'two'")


def test_unknown_stage(overfit_run):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", "--device", "cpu", "--stage", "stage9")
    assert_one_line_error(result, "'stage9'", "stage1_param_only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so --device cuda is valid")
def test_cuda_without_cuda(overfit_run):
    result = run_script("--checkpoint", overfit_run.out_dir / "best.pt", "--split-csv",
                        overfit_run.out_dir / "val_split.csv", "--device", "cuda")
    assert_one_line_error(result, "--device cuda", "not available")


# ------------------------------------------------------------------------------ autohdr.runs.compare

class TestCompareIdentity:
    def test_identity_model_has_zero_delta(self, small_loader):
        summary = compare_identity(IdentityModel(), small_loader, residual_active=False, device="cpu")
        assert summary["sample_count"] == 4
        assert summary["model"] == summary["identity"]
        assert set(summary["delta_model_minus_identity"].values()) == {0.0}

    def test_trained_model_differs_from_identity(self, overfit_run, small_loader):
        model = model_from_checkpoint(load_checkpoint(overfit_run.out_dir / "best.pt"))
        summary = compare_identity(model, small_loader, residual_active=False, device="cpu")
        assert summary["model"]["total"] != summary["identity"]["total"]
        assert summary["delta_model_minus_identity"] == score_delta(summary["model"], summary["identity"])

    def test_max_batches(self, small_loader):
        summary = compare_identity(IdentityModel(), small_loader, residual_active=False, device="cpu", max_batches=1)
        assert summary["sample_count"] == 2

    @pytest.mark.parametrize("max_batches", [0, -1])
    def test_rejects_non_positive_max_batches(self, small_loader, max_batches):
        with pytest.raises(ValueError, match=f"max_batches must be >= 1 or None, got {max_batches}"):
            compare_identity(IdentityModel(), small_loader, residual_active=False, max_batches=max_batches)

    def test_rejects_an_empty_loader(self):
        with pytest.raises(ValueError, match="no samples were scored"):
            compare_identity(IdentityModel(), [], residual_active=False)

    def test_leaves_the_model_in_training_mode(self, small_loader):
        model = IdentityModel().train()
        compare_identity(model, small_loader, residual_active=False, max_batches=1)
        assert model.training


class TestScoreDelta:
    def test_per_key_difference(self):
        model = {key: 0.5 + i / 16 for i, key in enumerate(PROXY_KEYS)}
        identity = {key: 0.25 for key in PROXY_KEYS}
        assert score_delta(model, identity) == {key: model[key] - 0.25 for key in PROXY_KEYS}

    def test_missing_key(self):
        with pytest.raises(KeyError, match="hard_fail"):
            score_delta({k: 0.0 for k in PROXY_KEYS if k != "hard_fail"}, {k: 0.0 for k in PROXY_KEYS})


class TestModelFromCheckpoint:
    def test_rebuilds_the_trained_model(self, overfit_run):
        payload = load_checkpoint(overfit_run.out_dir / "best.pt")
        model = model_from_checkpoint(payload)
        assert model.config == load_preset(OVERFIT.mode).model
        assert not model.training
        state = model.state_dict()
        assert state.keys() == payload["model"].keys()
        for name, tensor in payload["model"].items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)

    def test_without_model_config(self, overfit_run):
        payload = load_checkpoint(overfit_run.out_dir / "best.pt")
        payload.pop("model_config")
        with pytest.raises(ValueError, match="has no model_config"):
            model_from_checkpoint(payload)

    def test_weights_that_do_not_fit(self, overfit_run):
        payload = load_checkpoint(overfit_run.out_dir / "best.pt")
        payload["model_config"] = {**payload["model_config"], "widths": [8, 8, 8, 8]}
        with pytest.raises(ValueError, match="do not fit its model_config"):
            model_from_checkpoint(payload)

    def test_unknown_model_config_key(self, overfit_run):
        payload = load_checkpoint(overfit_run.out_dir / "best.pt")
        payload["model_config"] = {**payload["model_config"], "depth": 3}
        with pytest.raises(ValueError, match="unknown key 'depth'"):
            model_from_checkpoint(payload)


class TestCheckpointStage:
    def test_from_the_stage_entry(self):
        assert checkpoint_stage({"stage": "stage3_finetune", "config": {"stage": "stage1_param_only"}}) == "stage3_finetune"

    def test_from_the_train_config(self):
        assert checkpoint_stage({"config": {"stage": "stage2_hybrid"}}) == "stage2_hybrid"

    def test_missing(self):
        with pytest.raises(ValueError, match="records no stage"):
            checkpoint_stage({"model": {}})

    def test_unknown(self):
        with pytest.raises(ValueError, match="unknown stage 'stage7'"):
            checkpoint_stage({"stage": "stage7"})


class TestRunResizeHw:
    def test_reads_the_runs_report(self, overfit_run):
        expected = tuple(overfit_run.report["config"]["data"]["resize_hw"])
        assert run_resize_hw(overfit_run.out_dir / "best.pt") == expected

    def test_reads_the_runs_batch_size(self, overfit_run):
        assert run_batch_size(overfit_run.out_dir / "best.pt") == overfit_run.report["config"]["data"]["batch_size"] == 4

    def test_no_batch_size_without_a_report(self, tmp_path):
        assert run_batch_size(tmp_path / "best.pt") is None

    def test_no_report(self, tmp_path):
        assert run_resize_hw(tmp_path / "best.pt") is None

    def test_malformed_report(self, tmp_path):
        (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
        assert run_resize_hw(tmp_path / "best.pt") is None


def test_model_config_round_trips_through_a_checkpoint():
    """``to_dict`` turns tuples into lists; the rebuilt config must still equal the original."""
    from autohdr.training.config import to_dict
    from autohdr.lens.model import LensCorrectionModel
    config = ModelConfig(widths=(8, 16, 16, 24), head_hidden=12)
    model = LensCorrectionModel(config)
    rebuilt = model_from_checkpoint({"model": model.state_dict(), "model_config": to_dict(config)})
    assert rebuilt.config == config


# ------------------------------------------------------------------------------ a custom model (--model-factory)

CUSTOM_FACTORY = "tests.user_models:atanh_lens_model"
CUSTOM_HW = (64, 64)


def run_script_with_tests_importable(*args) -> subprocess.CompletedProcess:
    """:func:`run_script` with the repository root on ``PYTHONPATH``, so ``tests.user_models`` imports
    (as ``--model-factory`` documents: the module must be installed or on ``PYTHONPATH``)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})


@pytest.fixture(scope="module")
def custom_checkpoint(tmp_path_factory, fixture_root):
    """The user's model (tests/user_models.py: own modules, own config with ``backbone_name``) with
    its head moved off the identity, saved by the real Trainer as ``best.pt``, and a 4-pair split."""
    from autohdr.data import scan_pairs
    from autohdr.training.config import TrainConfig
    from autohdr.training.trainer import Trainer
    from tests.user_models import atanh_lens_model
    folder = tmp_path_factory.mktemp("custom-model")
    rows = scan_pairs(fixture_root).iloc[:4]
    csv = write_split_csv(rows, folder / "val_split.csv")
    dataset = PairDataset(rows, resize_hw=CUSTOM_HW)
    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("input_image", "target_image")}
    model = atanh_lens_model()
    with torch.no_grad():
        model.head.bias[0] += 0.3  # k1 = 0.5 tanh(0.3) = 0.146: a visible lens, so whose weights are scored shows
    trainer = Trainer(model, TrainConfig(stage="stage2_hybrid", epochs=1, progress=False), [batch], [batch],
                      out_dir=folder, log=lambda message: None)
    return trainer.save("best.pt"), csv, model.eval()


class TestCustomModelCheckpoint:
    def test_model_factory_scores_the_checkpoints_weights(self, custom_checkpoint):
        path, csv, model = custom_checkpoint
        result = run_script_with_tests_importable("--checkpoint", path, "--split-csv", csv, "--device", "cpu",
                                                  "--model-factory", CUSTOM_FACTORY, "--resize-hw", "64,64",
                                                  "--batch-size", 2)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["stage"] == "stage2_hybrid" and summary["sample_count"] == 4
        loader = make_loader(PairDataset(read_split_csv(csv), resize_hw=CUSTOM_HW), batch_size=2, shuffle=False)
        expected = compare_identity(model, loader, residual_active=True, device="cpu")
        assert summary["model"] == pytest.approx(expected["model"], **SAME_SCORE)
        assert abs(summary["delta_model_minus_identity"]["total"]) > 1e-3  # not a fresh (identity) model

    def test_without_model_factory_says_to_pass_one(self, custom_checkpoint):
        path, csv, _ = custom_checkpoint
        result = run_script("--checkpoint", path, "--split-csv", csv, "--device", "cpu")
        assert_one_line_error(result, f"checkpoint {path} model_config", "unknown key 'backbone_name'",
                              "pass --model-factory MODULE:FUNCTION")

    def test_without_model_config_says_to_pass_a_factory(self, custom_checkpoint):
        payload = load_checkpoint(custom_checkpoint[0])
        payload.pop("model_config")
        with pytest.raises(ValueError, match="has no model_config .*pass --model-factory"):
            model_from_checkpoint(payload, source=custom_checkpoint[0])
        model = model_from_checkpoint(payload, model_factory=CUSTOM_FACTORY, source=custom_checkpoint[0])
        for name, tensor in custom_checkpoint[2].state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    def test_factory_whose_model_does_not_fit(self, custom_checkpoint):
        path = custom_checkpoint[0]
        with pytest.raises(ValueError) as info:
            model_from_checkpoint(load_checkpoint(path), model_factory="tests.user_models:wider_atanh_lens_model",
                                  source=path)
        message = str(info.value)
        assert message.startswith(f"checkpoint {path}: its weights do not fit the model of --model-factory "
                                  "tests.user_models:wider_atanh_lens_model")
        assert "first mismatched key 'encoder.0.weight' has shape (8, 3, 3, 3) in the checkpoint, " \
               "(16, 3, 3, 3) in the model" in message

    def test_autohdr_checkpoint_into_a_custom_model(self, overfit_run):
        with pytest.raises(ValueError, match=r"^the checkpoint: its weights do not fit the model of --model-factory "
                                             r"tests\.user_models:atanh_lens_model: first mismatched key 'centre' "
                                             r"is missing from the checkpoint \(\d+ mismatched in all\)$"):
            model_from_checkpoint(load_checkpoint(overfit_run.out_dir / "best.pt"), model_factory=CUSTOM_FACTORY)

    @pytest.mark.parametrize("spec, fragment", [("atanh_lens_model", "must look like MODULE:FUNCTION"),
                                                ("tests.user_models:absent", "has no callable 'absent'")])
    def test_bad_factory(self, custom_checkpoint, spec, fragment):
        with pytest.raises(ValueError, match=fragment):
            model_from_checkpoint(load_checkpoint(custom_checkpoint[0]), model_factory=spec)
