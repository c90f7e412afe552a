"""The trainer and the runbook's instrumentation, checked from what it writes to ``metrics.jsonl``.

Every run is the real :class:`autohdr.training.trainer.Trainer` on the embedded fixture pairs (8 pairs at
64x64, batches of 4, a small model; see tests/helpers_trainer.py), read back with
``pandas.read_json(lines=True, precise_float=True, dtype=False)`` (the options that make pandas give
back exactly what was written; see :mod:`autohdr.diagnosis.metrics_log`). Runs that several tests judge are
module-scoped fixtures, so the file trains each configuration once. No assertion is made on wall-clock values: timing fields are
checked for presence and for their arithmetic relations only.
"""

from __future__ import annotations

import copy
import json
import math
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autohdr.training import checkpoint as ckpt
from autohdr.lens.evaluation import PROXY_KEYS
from autohdr.lens.losses import LOSS_TERMS, RESIDUAL_TERMS
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.lens.model import LensCorrectionModel, ModelConfig
from autohdr.training.trainer import NonFiniteLossError, Trainer, cosine_lr_factor
from tests import faults
from tests.helpers_trainer import (
    BATCH, CLOCK_FIELDS, PERF_FIELDS, STEPS_PER_EPOCH, TEST_WEIGHTS, FailingLoader, GlobalParamsOnly, NaNAfter,
    Run, SignalingLoader, config, expected_warning_steps, fixture_batches, make_trainer, read_history, read_records,
    seeded, train,
)
from tests.tolerances import assert_close

GROUPS = ("backbone", "param_head", "residual_head")
LOSS_NAMES = ("pixel", "ssim", "edge", "grad_orient", "flow_tv", "flow_mag", "flow_curv", "jacobian")
GRID_NAMES = tuple(f"{prefix}_{stat}" for prefix in ("param_grid_disp_px", "final_grid_disp_px", "residual_contrib_px")
                   for stat in ("mean", "max", "std")) + ("residual_to_param_disp_ratio_mean",)
STEP_NAMES = (tuple(f"grad_norm_{g}" for g in GROUPS) + tuple(f"param_delta_{g}" for g in GROUPS)
              + ("residual_head_grad_is_zero", "residual_head_param_delta_is_zero")
              + LOSS_NAMES + tuple(f"{n}_weighted" for n in LOSS_NAMES) + GRID_NAMES)
PROBE_NAMES = ("probe_pred_checksum", "probe_final_grid_checksum", "probe_params_checksum",
               "probe_proxy_total_score", "probe_pixel", "probe_ssim", "probe_edge")
CHECKSUMS = PROBE_NAMES[:3]
VAL_PROXY_NAMES = tuple(f"val_proxy_{k}" for k in PROXY_KEYS)
CUDA_FIELDS = ("cuda_mem_allocated_mb", "cuda_mem_reserved_mb", "max_cuda_mem_allocated_mb")

INACTIVE_THRESHOLD, INACTIVE_PATIENCE = 0.01, 3
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the trainer uses


# ---------------------------------------------------------------------------------------- helpers

def steps_of(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["kind"] == "train_step"].reset_index(drop=True)


def raw_of(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def without_clock(record: dict) -> dict:
    """A record minus its wall-clock fields (the only ones two identical runs may disagree on)."""
    return {k: v for k, v in record.items() if k not in CLOCK_FIELDS and not k.endswith("_ms_mean")}


#: figures accumulated over the training epoch in hand (train_val_agree): a resume in the middle of an
#: epoch restores them from the checkpoint (the validation observer's state), so every test compares them
EPOCH_ACCUMULATORS = ("train_epoch_loss_mean", "train_epoch_steps", "val_ids_match_train")


def assert_epoch_accumulators_compared(records: list[dict]) -> None:
    """The resumed run's validations carry the epoch's training figures, so ``comparable`` compares them."""
    val = raw_of(records, "val_epoch")
    assert val and all(name in r for r in val for name in EPOCH_ACCUMULATORS)


def comparable(records: list[dict]) -> list[dict]:
    """The records two runs of the same training must agree on. ``epoch_end`` / ``run_end`` also carry
    the process's own throughput counters, which restart (warm-up included) in a resumed process."""
    out = []
    for r in records:
        if r["kind"] in ("init", "train_step", "val_epoch", "warning"):
            out.append(without_clock(r))
        elif r["kind"] == "epoch_end":
            out.append({k: r[k] for k in ("kind", "epoch", "step")})
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def load_weights_only(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------- runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/plugins/threads.py


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer_runs")


def instrumented(stage: str, **changes) -> dict:
    return dict(stage=stage, debug_residual_inactive_threshold_px=INACTIVE_THRESHOLD,
                debug_residual_inactive_patience=INACTIVE_PATIENCE, **changes)


@pytest.fixture(scope="module")
def stage1_run(runs_dir) -> Run:
    return train(runs_dir / "stage1", config(**instrumented("stage1_param_only")))


@pytest.fixture(scope="module")
def stage2_run(runs_dir) -> Run:
    return train(runs_dir / "stage2", config(**instrumented("stage2_hybrid")))


@pytest.fixture(scope="module")
def stage2_repeat(runs_dir) -> Run:
    return train(runs_dir / "stage2-repeat", config(**instrumented("stage2_hybrid")))


@pytest.fixture(scope="module")
def zeroed_run(runs_dir) -> Run:
    """Stage 2 with the residual flow multiplied by zero before fusion: never contributes."""
    return train(runs_dir / "zeroed", config(**instrumented("stage2_hybrid")), seeded(faults.ZeroedResidual))


@pytest.fixture(scope="module")
def frozen_run(runs_dir) -> Run:
    return train(runs_dir / "frozen", config(**instrumented("stage2_hybrid")), seeded(faults.FrozenResidualHead))


@pytest.fixture(scope="module")
def perf_only_run(runs_dir) -> Run:
    return train(runs_dir / "perf-only", config("stage2_hybrid", debug_instrumentation=False))


@pytest.fixture(scope="module")
def perf_off_run(runs_dir) -> Run:
    return train(runs_dir / "perf-off", config("stage2_hybrid", debug_perf_enabled=False))


@pytest.fixture(scope="module")
def custom_run(runs_dir) -> Run:
    """A user's module (params only, no residual output, no backbone/head names) on plain lists."""
    return train(runs_dir / "custom", config("stage2_hybrid"), seeded(GlobalParamsOnly))


# ------------------------------------------------------------------ every name, in the right record

@pytest.mark.parametrize("run_name", ["stage1_run", "stage2_run"])
class TestRecordNames:
    def test_train_step_records_carry_every_step_name(self, request, run_name):
        run: Run = request.getfixturevalue(run_name)
        steps = steps_of(run.history)
        assert len(steps) == 3 * STEPS_PER_EPOCH
        missing = [n for n in STEP_NAMES + PERF_FIELDS if n not in steps.columns]
        assert not missing, f"train_step records lack {missing}"
        for record in raw_of(run.records(), "train_step"):  # in every record, not only in some
            assert not [n for n in STEP_NAMES + PERF_FIELDS if n not in record]
        numeric = [n for n in STEP_NAMES + PERF_FIELDS if not n.startswith("residual_head_")]
        assert np.isfinite(steps[list(numeric)].to_numpy(dtype=float)).all()

    def test_val_epoch_records_carry_probe_and_proxy_scores(self, request, run_name):
        run: Run = request.getfixturevalue(run_name)
        val = run.kind("val_epoch")
        assert list(val["epoch"]) == [0, 1, 2]
        missing = [n for n in PROBE_NAMES + VAL_PROXY_NAMES if n not in val.columns]
        assert not missing, f"val_epoch records lack {missing}"
        assert np.isfinite(val[list(PROBE_NAMES[3:] + VAL_PROXY_NAMES)].to_numpy(dtype=float)).all()
        for record in raw_of(run.records(), "val_epoch"):
            for name in CHECKSUMS:
                assert isinstance(record[name], str) and len(record[name]) == 16
            assert record["probe_sample_count"] == run.trainer.config.debug_probe_max_samples
        steps = steps_of(run.history)
        assert not [n for n in PROBE_NAMES if n in steps.columns and steps[n].notna().any()]

    def test_run_end_has_throughput(self, request, run_name):
        run: Run = request.getfixturevalue(run_name)
        end = run.kind("run_end")
        assert len(end) == 1 and end.loc[0, "samples_per_sec"] > 0
        assert end.loc[0, "steps"] == 3 * STEPS_PER_EPOCH
        assert run.result.samples_per_sec == end.loc[0, "samples_per_sec"]


def test_metrics_read_back_at_full_precision(stage2_run):
    records = stage2_run.records()
    for frame in (stage2_run.history, read_metrics(stage2_run.out_dir)):
        assert len(frame) == len(records)
        for row, record in enumerate(records):
            for key, value in record.items():
                if isinstance(value, (float, str)):  # floats bit for bit, checksums as the same strings
                    assert frame.at[row, key] == value, (record["kind"], key)


# ------------------------------------------------------------------ stage awareness of the residual

def test_stage1_reports_residual_branch_off_not_failed(stage1_run):
    start = raw_of(stage1_run.records(), "run_start")[0]
    assert start["stage"] == "stage1_param_only"
    assert start["residual_branch_active"] is False
    assert start["residual_terms"] is False and start["jacobian_term"] is False
    steps = steps_of(stage1_run.history)
    assert (steps["grad_norm_residual_head"] == 0.0).all()
    assert (steps["param_delta_residual_head"] == 0.0).all()
    assert (steps["residual_contrib_px_mean"] == 0.0).all()
    # ... while the stage did train what it trains
    assert (steps["grad_norm_param_head"] > 0).all() and (steps["param_delta_param_head"] > 0).all()
    for record in raw_of(stage1_run.records(), "train_step"):
        assert record["residual_branch_active"] is False
        # "off", not "zero" (a failure): the flags say nothing in a stage without the branch
        assert record["residual_head_grad_is_zero"] is None
        assert record["residual_head_param_delta_is_zero"] is None
    assert stage1_run.kind("warning").empty, "a stage-1 run must not warn about an inactive residual"


def test_stage2_residual_branch_learns_and_contributes(stage2_run):
    start = raw_of(stage2_run.records(), "run_start")[0]
    assert start["residual_branch_active"] is True and start["residual_terms"] is True
    steps = steps_of(stage2_run.history)
    assert (steps["grad_norm_residual_head"] > 0).all()
    assert (steps["param_delta_residual_head"] > 0).all()
    assert steps["residual_contrib_px_mean"].iloc[-1] > 0
    assert (steps["residual_contrib_px_max"] >= steps["residual_contrib_px_mean"]).all()
    for record in raw_of(stage2_run.records(), "train_step"):
        assert record["residual_head_grad_is_zero"] is False
        assert record["residual_head_param_delta_is_zero"] is False


def test_frozen_residual_head_logs_exact_zeros(frozen_run):
    start = frozen_run.kind("run_start").iloc[0]
    assert start["trainable_params"]["residual_head"] == 0
    steps = steps_of(frozen_run.history)
    assert (steps["grad_norm_residual_head"] == 0.0).all()
    assert (steps["param_delta_residual_head"] == 0.0).all()
    assert (steps["grad_norm_param_head"] > 0).all() and (steps["param_delta_param_head"] > 0).all()
    for record in raw_of(frozen_run.records(), "train_step"):
        assert record["residual_head_grad_is_zero"] is True
        assert record["residual_head_param_delta_is_zero"] is True


# ------------------------------------------------------------------ gradient norms before clipping

@pytest.fixture(scope="module")
def one_step_runs(runs_dir) -> dict[str, tuple[Run, dict]]:
    """A single optimizer step with a tiny and with a huge clip norm, and each model's initial state."""
    out = {}
    for label, clip in (("tiny", 1e-9), ("huge", 1e9)):
        model = seeded()
        initial = copy.deepcopy(model.state_dict())
        cfg = config("stage1_param_only", epochs=1, max_steps_per_epoch=1, weight_decay=0.0, grad_clip_norm=clip)
        out[label] = (train(runs_dir / f"clip-{label}", cfg, model), initial)
    return out


def test_grad_norms_are_logged_before_clipping(one_step_runs):
    run, _ = one_step_runs["tiny"]
    clip = run.trainer.config.grad_clip_norm
    step = steps_of(run.history).iloc[0]
    assert step["grad_clipped"] == True  # noqa: E712
    assert step["grad_norm_total"] > 1e6 * clip
    # the group norms make up the total (trainable groups only: stage 1 leaves the residual head out)
    groups = math.sqrt(step["grad_norm_backbone"] ** 2 + step["grad_norm_param_head"] ** 2)
    assert groups == pytest.approx(step["grad_norm_total"], rel=1e-5)
    assert step["grad_norm_param_head"] > 1e6 * clip


def test_update_size_is_that_of_clipped_gradients(one_step_runs):
    # Adam's first step moves each weight by lr * g / (|g| + eps). With every |g| <= clip << eps the
    # whole update has norm between lr * clip / (eps + clip) and lr * clip / eps; unclipped
    # gradients (|g| >> eps) would move each weight by about lr instead.
    tiny, _ = one_step_runs["tiny"]
    step = steps_of(tiny.history).iloc[0]
    cfg = tiny.trainer.config
    assert step["lr"] == cfg.lr * cosine_lr_factor(0, 1, cfg.warmup_steps, cfg.min_lr_ratio)
    delta = math.sqrt(sum(step[f"param_delta_{g}"] ** 2 for g in GROUPS))
    clip = cfg.grad_clip_norm
    low, high = step["lr"] * clip / (ADAM_EPS + clip), step["lr"] * clip / ADAM_EPS
    assert 0.99 * low <= delta <= 1.01 * high

    huge, _ = one_step_runs["huge"]
    control = steps_of(huge.history).iloc[0]
    assert control["grad_clipped"] == False  # noqa: E712
    assert control["grad_norm_total"] == pytest.approx(step["grad_norm_total"], rel=1e-6)  # same first gradient
    assert math.sqrt(sum(control[f"param_delta_{g}"] ** 2 for g in GROUPS)) > 100 * high


@pytest.mark.parametrize("label", ["tiny", "huge"])
def test_param_delta_is_the_change_of_the_weights(one_step_runs, label):
    run, initial = one_step_runs[label]
    step = steps_of(run.history).iloc[0]
    final = run.trainer.core.state_dict()
    for group in GROUPS:
        names = [n for n in initial if n.startswith(group + ".")]
        change = torch.cat([(final[n] - initial[n]).reshape(-1).double() for n in names]).norm().item()
        assert step[f"param_delta_{group}"] == pytest.approx(change, rel=1e-4, abs=1e-12)


def test_logged_lr_is_the_rate_each_step_used(stage2_run):
    cfg = stage2_run.trainer.config
    steps = steps_of(stage2_run.history)
    total = STEPS_PER_EPOCH * cfg.epochs
    expected = [cfg.lr * cosine_lr_factor(s - 1, total, cfg.warmup_steps, cfg.min_lr_ratio) for s in steps["step"]]
    assert list(steps["step"]) == list(range(1, total + 1))
    assert steps["lr"].tolist() == expected


class IterableOnly:
    """The fixture batches behind ``__iter__`` alone: a streaming loader with no ``len()``."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_loader_without_len_learns_the_schedule_from_the_first_epoch(stage2_run, tmp_path):
    """No len(): the first epoch runs at the peak rate after warm-up, then the cosine schedule the
    len()-able run used from there on (its length measured, not assumed to be 1 step per epoch)."""
    cfg = stage2_run.trainer.config
    streamed = train(tmp_path, cfg, seeded(), train_loader=IterableOnly(fixture_batches()))
    ours, theirs = steps_of(streamed.history), steps_of(stage2_run.history)
    assert streamed.trainer.schedule_total_steps == STEPS_PER_EPOCH * cfg.epochs
    first = ours["step"] <= STEPS_PER_EPOCH
    warm = ours["step"] <= cfg.warmup_steps
    assert ours["lr"][first & ~warm].eq(cfg.lr).all() and ours["lr"][warm].tolist() == theirs["lr"][warm].tolist()
    assert ours["lr"][~first].tolist() == theirs["lr"][~first].tolist()


# ------------------------------------------------------------------ loss components

@pytest.mark.parametrize("run_name", ["stage1_run", "stage2_run"])
def test_weighted_terms_are_raw_times_configured_weight(request, run_name):
    run: Run = request.getfixturevalue(run_name)
    steps = steps_of(run.history)
    for name in LOSS_TERMS:
        raw = torch.tensor(steps[name].to_numpy(), dtype=torch.float32)
        weighted = torch.tensor(steps[f"{name}_weighted"].to_numpy(), dtype=torch.float32)
        assert_close(weighted, raw * getattr(TEST_WEIGHTS, name))
    total = torch.tensor(steps[[f"{n}_weighted" for n in LOSS_TERMS]].to_numpy().sum(axis=1), dtype=torch.float32)
    assert_close(torch.tensor(steps["loss"].to_numpy(), dtype=torch.float32), total)


def test_terms_switched_off_by_stage1_are_zero(stage1_run):
    steps = steps_of(stage1_run.history)
    for name in RESIDUAL_TERMS + ("jacobian",):
        assert (steps[name] == 0.0).all() and (steps[f"{name}_weighted"] == 0.0).all()
    assert (steps["pixel_weighted"] > 0).all()


def test_stage2_regularizers_count(stage2_run):
    steps = steps_of(stage2_run.history)
    for name in RESIDUAL_TERMS:  # zero on the first step only (the residual head starts at zero flow)
        assert (steps[f"{name}_weighted"].iloc[1:] > 0).all(), name


# ------------------------------------------------------------------ geometry

@pytest.mark.parametrize("run_name", ["stage1_run", "zeroed_run", "custom_run"])
def test_final_grid_equals_param_grid_without_residual(request, run_name):
    steps = steps_of(request.getfixturevalue(run_name).history)
    for stat in ("mean", "max", "std"):
        assert steps[f"final_grid_disp_px_{stat}"].tolist() == steps[f"param_grid_disp_px_{stat}"].tolist()
        assert (steps[f"residual_contrib_px_{stat}"] == 0.0).all()
    assert (steps["residual_to_param_disp_ratio_mean"] == 0.0).all()
    assert (steps["param_grid_disp_px_mean"].iloc[1:] > 0).all()  # the parametric warp did move


def test_grid_statistics_are_consistent_with_a_residual(stage2_run):
    s = steps_of(stage2_run.history).iloc[1:]  # from the second step the residual is non-zero
    tol = 1e-5
    assert ((s["final_grid_disp_px_mean"] - s["param_grid_disp_px_mean"]).abs()
            <= s["residual_contrib_px_mean"] + tol).all()
    assert (s["final_grid_disp_px_max"] <= s["param_grid_disp_px_max"] + s["residual_contrib_px_max"] + tol).all()
    for prefix in ("param_grid_disp_px", "final_grid_disp_px", "residual_contrib_px"):
        assert (s[f"{prefix}_mean"] <= s[f"{prefix}_max"]).all() and (s[f"{prefix}_std"] >= 0).all()
    assert (s["final_grid_disp_px_mean"] != s["param_grid_disp_px_mean"]).any()
    ratio = s["residual_contrib_px_mean"] / s["param_grid_disp_px_mean"].clip(lower=1e-6)
    assert np.allclose(s["residual_to_param_disp_ratio_mean"], ratio, rtol=1e-5)


# ------------------------------------------------------------------ validation probe

def test_probe_checksums_repeat_for_the_same_state(stage2_run):
    trainer = stage2_run.trainer
    first = trainer.validate()
    trainer.model.eval()
    second = trainer.validate()
    assert not trainer.model.training, "validate() must leave the model's mode as it found it"
    trainer.model.train()
    last_logged = raw_of(stage2_run.records(), "val_epoch")[-1]
    for name in CHECKSUMS + ("param_checksum",):
        assert first[name] == second[name] == last_logged[name], name
    assert first["probe_proxy_total_score"] == last_logged["probe_proxy_total_score"]


def test_probe_checksums_change_with_training(stage2_run, runs_dir):
    val = raw_of(stage2_run.records(), "val_epoch")
    for name in CHECKSUMS:
        assert len({r[name] for r in val}) == len(val), f"{name} repeats across epochs"
    untrained = make_trainer(runs_dir / "untrained", config("stage2_hybrid")).validate()
    for name in CHECKSUMS:
        assert untrained[name] not in {r[name] for r in val}


# ------------------------------------------------------------------ performance fields

def test_timing_fields_with_perf_alone(perf_only_run):
    steps = steps_of(perf_only_run.history)
    for record in raw_of(perf_only_run.records(), "train_step"):
        assert not [n for n in PERF_FIELDS if n not in record]
        assert not [n for n in CUDA_FIELDS if n in record], "CUDA memory fields on a CPU run"
        assert "grad_norm_backbone" not in record and "param_delta_backbone" not in record
    assert (steps[list(PERF_FIELDS)] >= 0).all().all()
    assert "probe_pred_checksum" not in perf_only_run.kind("val_epoch").columns


def test_no_timing_fields_with_perf_off(perf_off_run):
    for record in raw_of(perf_off_run.records(), "train_step"):
        assert not [n for n in PERF_FIELDS + ("instrumentation_ms",) if n in record]
        assert "grad_norm_residual_head" in record


@pytest.mark.parametrize("run_name", ["stage2_run", "perf_only_run"])
def test_run_samples_per_sec_is_samples_over_wall_time_after_warmup(request, run_name):
    run: Run = request.getfixturevalue(run_name)
    warmup = run.trainer.config.debug_perf_warmup_steps
    steps = steps_of(run.history)
    end = run.kind("run_end").iloc[0]
    measured, warm = steps.iloc[warmup:], steps.iloc[:warmup]
    assert end["warmup_steps"] == warmup and end["steps"] == len(steps)
    assert end["warmup_wall_ms"] == pytest.approx(warm["batch_time_ms"].sum(), rel=1e-12)
    wall_s = measured["batch_time_ms"].sum() / 1000.0
    assert end["samples_per_sec"] == pytest.approx(measured["batch_size"].sum() / wall_s, rel=1e-12)
    # each step's own rate is its batch over its own wall time
    assert np.allclose(steps["samples_per_sec"], steps["batch_size"] * 1000.0 / steps["batch_time_ms"], rtol=1e-12)
    assert (steps["batch_size"] == BATCH).all()
    if run.trainer.config.debug_instrumentation:
        frac = measured["instrumentation_ms"].sum() / measured["batch_time_ms"].sum()
        assert end["instrumentation_overhead_frac"] == pytest.approx(frac, rel=1e-12)
        assert 0 < end["instrumentation_overhead_frac"] < 1
    else:
        assert "instrumentation_ms" not in steps.columns or (steps["instrumentation_ms"] == 0).all()


# ------------------------------------------------------------------ inactive-residual warning

def test_inactive_warning_fires_after_exactly_patience_steps(zeroed_run):
    steps = steps_of(zeroed_run.history)
    assert (steps["residual_contrib_px_mean"] == 0.0).all()
    warnings = zeroed_run.kind("warning")
    assert set(warnings["name"]) == {"residual_inactive"}
    expected = expected_warning_steps(steps["step"], steps["residual_contrib_px_mean"],
                                      INACTIVE_THRESHOLD, INACTIVE_PATIENCE)
    assert warnings["step"].astype(int).tolist() == expected
    assert len(expected) == len(steps) // INACTIVE_PATIENCE  # every patience-th step, never earlier
    assert (warnings["residual_contrib_px_mean"] < INACTIVE_THRESHOLD).all()


def test_no_inactive_warning_in_a_healthy_run(stage2_run):
    steps = steps_of(stage2_run.history)
    assert expected_warning_steps(steps["step"], steps["residual_contrib_px_mean"],
                                  INACTIVE_THRESHOLD, INACTIVE_PATIENCE) == []
    assert (steps["residual_contrib_px_mean"] < INACTIVE_THRESHOLD).any()  # the count did start (step 1)
    assert stage2_run.kind("warning").empty


# ------------------------------------------------------------------ determinism and resume

def test_two_seeded_runs_are_identical(stage2_run, stage2_repeat):
    a, b = stage2_run.records(), stage2_repeat.records()
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    assert comparable(a) == comparable(b)
    assert_same_state(stage2_run.trainer.core.state_dict(), stage2_repeat.trainer.core.state_dict())


class SimulatedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("run_name,model_cls", [("stage2_run", None), ("zeroed_run", faults.ZeroedResidual)])
def test_resume_from_last_continues_like_the_uninterrupted_run(request, tmp_path, run_name, model_cls):
    full: Run = request.getfixturevalue(run_name)
    cfg = full.trainer.config
    make = (lambda seed: seeded(model_cls, seed)) if model_cls else (lambda seed: seeded(seed=seed))
    crashing = FailingLoader(fixture_batches(), SimulatedCrash("power cut"), at_epoch=1, at_batch=1)
    with pytest.raises(SimulatedCrash):
        train(tmp_path, cfg, make(0), train_loader=crashing)
    # a new process: a differently initialized model, the same folder, the remaining epochs
    resumed = train(tmp_path, cfg, make(99), resume_from=tmp_path / "last.pt")

    ours, theirs = resumed.records(), full.records()
    assert comparable(ours) == comparable(theirs)
    assert_epoch_accumulators_compared(ours)
    assert [r["kind"] for r in ours if r["kind"] != "run_start"] == [r["kind"] for r in theirs
                                                                    if r["kind"] != "run_start"]
    starts = raw_of(ours, "run_start")
    assert len(starts) == 2 and starts[1]["resumed_from"] == str(tmp_path / "last.pt") and starts[1]["start_epoch"] == 1
    assert resumed.result.global_step == full.result.global_step
    assert resumed.result.best_epoch == full.result.best_epoch
    assert_same_state(resumed.trainer.core.state_dict(), full.trainer.core.state_dict())
    assert_same_state(load_weights_only(tmp_path / "last.pt")["model"],
                      load_weights_only(full.out_dir / "last.pt")["model"])
    # pandas reads the continued file like the uninterrupted one
    a = steps_of(read_history(tmp_path)).set_index("step")
    b = steps_of(full.history).set_index("step")
    for name in ("loss", "grad_norm_total", "residual_contrib_px_mean", "param_delta_backbone"):
        assert a[name].tolist() == b[name].tolist()


# ------------------------------------------------------------------ checkpoints

def test_best_checkpoint_is_the_epoch_with_max_val_proxy(stage1_run, runs_dir):
    val = stage1_run.kind("val_epoch")
    best_epoch = int(val["epoch"][val["val_proxy_total"].idxmax()])
    best = load_weights_only(stage1_run.out_dir / "best.pt")
    assert best["epoch"] == best_epoch == stage1_run.result.best_epoch
    assert best["best_score"] == val["val_proxy_total"].max() == stage1_run.result.best_score
    running, expected_flags = -math.inf, []
    for score in val["val_proxy_total"]:
        expected_flags.append(bool(score > running))
        running = max(running, score)
    assert val["is_best"].astype(bool).tolist() == expected_flags
    # the stored weights score exactly what was logged for that epoch
    model = seeded(seed=5)
    model.load_state_dict(best["model"])
    rescored = make_trainer(runs_dir / "rescore", config("stage1_param_only"), model).validate()
    assert rescored["val_proxy_total"] == val["val_proxy_total"].max()


def test_last_checkpoint_is_the_final_state(stage1_run):
    last = load_weights_only(stage1_run.out_dir / "last.pt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * STEPS_PER_EPOCH
    assert_same_state(last["model"], stage1_run.trainer.core.state_dict())


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_checkpoints_load_with_weights_only(stage2_run, name):
    payload = load_weights_only(stage2_run.out_dir / name)
    for key in ("model", "optimizer", "scheduler", "epoch", "global_step", "best_score", "config", "rng",
                "model_config", "stage"):
        assert key in payload, key
    assert payload["stage"] == "stage2_hybrid" and payload["config"]["stage"] == "stage2_hybrid"
    assert ckpt.load_checkpoint(stage2_run.out_dir / name)["global_step"] == payload["global_step"]


def test_save_atomic_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.ones(3)}, "epoch": 0}, target)
    before = target.read_bytes()

    def torn_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 1}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_trainer_crash_while_saving_keeps_previous_last(tmp_path, monkeypatch):
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 1:
            handle.write(b"partial")
            raise OSError("disk full while writing epoch 1")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, config("stage1_param_only", epochs=3))
    monkeypatch.undo()
    last = load_weights_only(tmp_path / "last.pt")
    assert last["epoch"] == 0 and last["global_step"] == STEPS_PER_EPOCH
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert read_records(tmp_path)[-1]["kind"] == "run_end"


def test_ctrl_c_mid_epoch_writes_interrupted_checkpoint(tmp_path):
    loader = FailingLoader(fixture_batches(), KeyboardInterrupt(), at_epoch=1, at_batch=1)
    run = train(tmp_path, config("stage2_hybrid"), train_loader=loader)
    assert run.result.interrupted is True
    assert run.result.global_step == STEPS_PER_EPOCH + 1 and run.result.epochs_completed == 1
    state = load_weights_only(tmp_path / "interrupted.pt")
    assert state["global_step"] == STEPS_PER_EPOCH + 1 and state["epoch"] == 1
    assert_same_state(state["model"], run.trainer.core.state_dict())
    assert load_weights_only(tmp_path / "last.pt")["global_step"] == STEPS_PER_EPOCH
    history = run.history
    assert history["kind"].iloc[-2:].tolist() == ["interrupted", "run_end"]
    assert history[history["kind"] == "run_end"]["interrupted"].item() == True  # noqa: E712
    assert steps_of(history)["step"].tolist() == list(range(1, STEPS_PER_EPOCH + 2))


@pytest.mark.parametrize("at_batch", [0, 1])
def test_resume_from_interrupted_finishes_the_epoch_like_the_uninterrupted_run(stage2_run, tmp_path, at_batch):
    """Ctrl-C mid-epoch, then resume from interrupted.pt: the rest of that epoch is trained, not skipped."""
    cfg = stage2_run.trainer.config
    loader = FailingLoader(fixture_batches(), KeyboardInterrupt(), at_epoch=1, at_batch=at_batch)
    interrupted = train(tmp_path, cfg, seeded(), train_loader=loader)
    state = load_weights_only(tmp_path / "interrupted.pt")
    assert state["epoch_complete"] is False and state["steps_done_in_epoch"] == at_batch
    resumed = train(tmp_path, cfg, seeded(seed=99), resume_from=tmp_path / "interrupted.pt")
    assert interrupted.result.interrupted and not resumed.result.interrupted
    assert resumed.result.global_step == stage2_run.result.global_step
    assert comparable(resumed.records()) == comparable(stage2_run.records())
    assert_epoch_accumulators_compared(resumed.records())
    assert_same_state(resumed.trainer.core.state_dict(), stage2_run.trainer.core.state_dict())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_amid_multiprocess_loading_stops_after_the_step_and_resumes_exactly(stage2_run, tmp_path, signum):
    """The signal arrives inside the DataLoader's code; it must neither be lost nor tear a file:
    the step in hand finishes, interrupted.pt is written, and resuming matches the full run."""
    cfg = stage2_run.trainer.config
    loader = SignalingLoader(signum, at_epoch=1, at_batch=0)
    handler_before = signal.getsignal(signum)
    interrupted = train(tmp_path, cfg, seeded(), train_loader=loader)
    assert signal.getsignal(signum) == handler_before  # fit() put the previous handler back
    assert interrupted.result.interrupted is True
    assert interrupted.result.global_step == STEPS_PER_EPOCH + 1  # batch 0 of epoch 1 was still trained
    state = load_weights_only(tmp_path / "interrupted.pt")
    assert state["epoch_complete"] is False and state["steps_done_in_epoch"] == 1
    resumed = train(tmp_path, cfg, seeded(seed=99), resume_from=tmp_path / "interrupted.pt")
    assert comparable(resumed.records()) == comparable(stage2_run.records())
    assert_epoch_accumulators_compared(resumed.records())
    assert_same_state(resumed.trainer.core.state_dict(), stage2_run.trainer.core.state_dict())


@pytest.mark.parametrize("how", ["init_from", "resume_from"])
def test_a_checkpoint_of_another_architecture_is_a_clear_error(stage1_run, tmp_path, how):
    other = LensCorrectionModel(ModelConfig(widths=(8, 16, 32), groups=4, head_hidden=32, residual_hidden=8,
                                            residual_stride=4))
    best = stage1_run.out_dir / "best.pt"
    with pytest.raises(ValueError, match=r"checkpoint .*best\.pt does not fit this model") as caught:
        train(tmp_path, config("stage2_hybrid"), other, **{how: best})
    assert "size mismatch" in str(caught.value) and "\n" not in str(caught.value)


def test_init_from_starts_stage2_from_stage1_best(stage1_run, tmp_path):
    best_path = stage1_run.out_dir / "best.pt"
    best = load_weights_only(best_path)
    model = seeded(seed=7)
    assert any(not torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    seen: dict[str, torch.Tensor] = {}

    def snapshot_first_training_forward(module, args):
        if module.training and not seen:
            seen.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    model.register_forward_pre_hook(snapshot_first_training_forward)
    run = train(tmp_path, config("stage2_hybrid", epochs=1), model, init_from=best_path)
    assert_same_state(seen, best["model"])
    init = run.kind("init").iloc[0]
    assert init["from_checkpoint"] == True  # noqa: E712
    assert init["init_pred_max_abs_diff"] > 0  # stage 1's weights, not a fresh identity model
    assert run.kind("run_start").iloc[0]["init_from"] == str(best_path)


# ------------------------------------------------------------------ non-finite values

def test_non_finite_loss_stops_the_run_with_an_error_record(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 3") as caught:
        train(tmp_path, config("stage1_param_only"), seeded(NaNAfter, good_steps=STEPS_PER_EPOCH))
    records = read_records(tmp_path)
    errors = raw_of(records, "error")
    assert len(errors) == 1 and errors[0]["step"] == 3 and errors[0]["message"] == str(caught.value)
    assert "lr=" in errors[0]["message"] and "pixel" in errors[0]["message"]
    assert [r["step"] for r in raw_of(records, "train_step")] == [1, 2]
    assert records[-1]["kind"] == "run_end"
    assert read_history(tmp_path)["kind"].tolist()[-2:] == ["error", "run_end"]


def test_enormous_learning_rate_stops_the_run_with_non_finite_error(tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite") as caught:
        train(tmp_path, config("stage2_hybrid", lr=1e8, grad_clip_norm=1e9))
    errors = read_history(tmp_path).query("kind == 'error'")
    assert len(errors) == 1 and errors["message"].item() == str(caught.value)
    assert "lr=100000000.0" in str(caught.value)


# ------------------------------------------------------------------ any module, any iterable

def test_custom_module_without_residual_on_plain_lists(custom_run):
    assert isinstance(custom_run.trainer.train_loader, list)
    steps = steps_of(custom_run.history)
    assert len(steps) == 3 * STEPS_PER_EPOCH and np.isfinite(steps["loss"]).all()
    assert (steps["grad_norm_other"] > 0).all() and (steps["param_delta_other"] > 0).all()
    start = custom_run.kind("run_start").iloc[0]
    for group in GROUPS:  # none of the model's parameters lives under these names: not measured, said once
        assert f"grad_norm_{group}" not in steps and f"param_delta_{group}" not in steps
        assert start["parameter_groups"][group]["values"] == 0
        assert any(f"--groups {group}=" in notice for notice in start["notices"]), start["notices"]
    for name in RESIDUAL_TERMS:  # no flow, so no flow regularizer, even in stage 2
        assert (steps[f"{name}_weighted"] == 0).all()
    assert len(custom_run.kind("val_epoch")) == 3 and custom_run.kind("val_epoch")["probe_pixel"].notna().all()


def test_a_loss_without_gradient_path_is_a_clear_error(tmp_path):
    """Stage 1 trains only the parameter head: detaching it leaves nothing to train, said plainly."""
    with pytest.raises(ValueError, match=r"stage1_param_only loss does not depend on any trainable parameter"):
        train(tmp_path, config("stage1_param_only"), seeded(faults.DetachedParamHead))


def test_public_train_step_is_the_step_fit_runs(tmp_path):
    """``Trainer.train_step`` (what benchmarks call) records exactly what ``fit``'s loop records."""
    batches = fixture_batches()
    cfg = config("stage2_hybrid", epochs=1)
    fitted = train(tmp_path / "fit", cfg, train_loader=batches, val_loader=batches)
    fit_steps = [r for r in read_records(fitted.out_dir) if r["kind"] == "train_step"]
    trainer = make_trainer(tmp_path / "manual", cfg, seeded(), batches, batches)
    manual = [trainer.train_step(batch) for batch in batches]
    assert trainer.global_step == len(batches) and [r["step"] for r in manual] == [1, 2]
    for fit_record, step_record in zip(fit_steps, manual, strict=True):
        step_record = json.loads(json.dumps(step_record))  # as written to metrics.jsonl
        for key in set(fit_record) - set(CLOCK_FIELDS):
            assert step_record[key] == fit_record[key], key
    assert fitted.trainer.parameter_checksum() == trainer.parameter_checksum()


# ------------------------------------------------------------------ validation cadence

@pytest.mark.parametrize(("epochs", "every", "interval"), [(88, 8, 8), (8, 8, 2), (3, 8, 1), (10, 1, 1), (40, 3, 3)])
def test_validation_interval_is_capped_so_a_run_validates_at_least_four_times(epochs, every, interval):
    cfg = config("stage1_param_only", epochs=epochs, validate_every=every)
    assert cfg.validation_interval == interval
    assert len([e for e in range(epochs) if (e + 1) % interval == 0 or e == epochs - 1]) >= min(4, epochs)


def test_validate_every_validates_on_those_epochs_and_the_last(runs_dir, monkeypatch):
    """8 epochs validated every 2: epochs 2, 4, 6, 8 (1-based); best.pt comes from one of them;
    last.pt is written with each validation; every epoch still trains, and training is the same as
    validating every epoch."""
    saved = []
    real_save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, name: saved.append((self.epoch, name)) or real_save(self, name))
    sparse = train(runs_dir / "every-2", config("stage1_param_only", epochs=8, validate_every=2))
    assert [epoch for epoch, name in saved if name == "last.pt"] == [1, 3, 5, 7]
    assert {epoch for epoch, name in saved if name == "best.pt"} <= {1, 3, 5, 7}
    dense = train(runs_dir / "every-1", config("stage1_param_only", epochs=8, validate_every=1))
    val = sparse.kind("val_epoch")
    assert val["epoch"].tolist() == [1, 3, 5, 7]
    assert sparse.kind("train_step")["step"].tolist() == dense.kind("train_step")["step"].tolist()
    assert_same_state(sparse.trainer.core.state_dict(), dense.trainer.core.state_dict())
    assert load_weights_only(sparse.out_dir / "best.pt")["epoch"] in {1, 3, 5, 7}
    assert load_weights_only(sparse.out_dir / "last.pt")["epoch"] == 7


def test_validate_every_must_be_positive():
    with pytest.raises(ValueError, match="validate_every must be >= 1, got 0"):
        config("stage1_param_only", validate_every=0)


# ---------------------------------------------------------------------------------------- the optimizer, built late

class TestOptimizerBuiltAfterTheInitCheck:
    """A fresh run builds AdamW after the init check (its first use imports torch._dynamo, ~0.8 s),
    so an init fault stops before that cost; run_start still records the groups it then builds."""

    def test_run_start_records_the_groups_the_optimizer_has_at_step_0(self, tmp_path):
        from autohdr.diagnosis.observers.optimizer import optimizer_groups
        cfg = config("stage2_hybrid", epochs=1, warmup_steps=2)
        train(tmp_path / "run", cfg)
        start = next(r for r in read_records(tmp_path / "run") if r["kind"] == "run_start")
        fresh = make_trainer(tmp_path / "fresh", cfg)
        assert start["optimizer_groups"] == optimizer_groups(fresh.optimizer, fresh.groups)
        # the warm-up's first rate, not the configured peak nor a default
        peak = cfg.lr * fresh.spec.lr_scale
        assert start["optimizer_groups"][0]["lr"] == pytest.approx(peak * cosine_lr_factor(0, 2, 2, cfg.min_lr_ratio))
        assert start["optimizer_groups"][0]["lr"] < peak

    def test_an_init_stop_never_builds_the_optimizer(self, tmp_path):
        class StopAtInit(Exception):
            pass

        def stop(point, step):
            if point == "init":
                raise StopAtInit
        trainer = Trainer(seeded(), config("stage2_hybrid", epochs=1), fixture_batches(), fixture_batches(),
                          out_dir=tmp_path, device="cpu", log=lambda message: None, early_check=stop)
        with pytest.raises(StopAtInit):
            trainer.fit()
        assert trainer._optimizer is None
        kinds = [r["kind"] for r in read_records(tmp_path)]
        assert kinds == ["run_start", "init", "run_end"]

    def test_groups_that_differ_from_the_announced_ones_are_an_error(self, tmp_path, monkeypatch):
        trainer = make_trainer(tmp_path, config("stage2_hybrid", epochs=1))
        announced = trainer.planned_optimizer_groups()
        monkeypatch.setattr(trainer, "_announced_groups", [{**announced[0], "eps": 1.0}])
        with pytest.raises(RuntimeError, match="differ from those run_start recorded"):
            trainer.optimizer  # noqa: B018
