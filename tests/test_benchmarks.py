"""Benchmarks: a training step with instrumentation on and off, the warp, the proxy score, data loading.

Benchmarks measure; they never assert on time. Each one also checks what it ran (a finite loss,
parameters that moved, output shapes), so it is a test that can fail like any other. Derived
figures (samples/sec, the instrumentation overhead, CUDA memory) go to ``benchmark.extra_info``,
which ``--benchmark-json FILE`` / ``--benchmark-save NAME`` store next to the timings.

Running::

    pytest tests/test_benchmarks.py --benchmark-only -p no:xdist   # CPU figures, here
    pytest -m gpu --benchmark-only                                 # the GPU figures, on a CUDA machine

Under ``-n`` (xdist) or ``--benchmark-disable`` pytest-benchmark turns timing off: each benchmark
calls its function once, the checks still run, and no figures are recorded. Tests marked ``gpu``
are skipped with the reason where CUDA is missing (``tests/plugins/gpu.py``).

How a training step is timed (:class:`TrainStep`): one call of the public
``Trainer.train_step`` (the body of ``Trainer.fit``'s step loop minus fetching the batch):
host-to-device copy, forward + loss, backward, gradient norms, clipping, optimizer and scheduler,
parameter deltas, grid statistics, the single host read and the perf fields. "Instrumentation on" means
``debug_instrumentation`` and ``debug_perf_enabled`` both on; "off" means both off. The overhead
is ``median(on) / median(off) - 1`` for the same stage and device, recorded on the "on" benchmark
when its "off" partner ran earlier in the same process.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from autohdr.training.config import TrainConfig
from autohdr.data import PairDataset, make_loader, scan_pairs
from autohdr.lens.geometry import apply_correction, identity_params
from autohdr.lens.model import DEFAULT_PARAM_BOUNDS, LensCorrectionModel
from autohdr.lens.proxy import SCORE_KEYS, proxy_score
from autohdr.training.trainer import Trainer

STAGES = ("stage1_param_only", "stage2_hybrid")

# CPU shapes (the debug presets: batch 8 at 128x128) and rounds (the whole file < 60 s here)
CPU_BATCH, CPU_HW = 8, (128, 128)
CPU_STEP_ROUNDS, CPU_STEP_WARMUP = 30, 3
WARP_BATCH, WARP_HW = 8, (256, 256)
# GPU shapes: the full-training preset (presets/train.toml: batch 16 at 256x256)
GPU_BATCH, GPU_HW = 16, (256, 256)
GPU_STEP_ROUNDS, GPU_STEP_WARMUP = 30, 5  # warm-up also covers cudnn.benchmark's autotuning
GPU_AMP_DTYPE = torch.bfloat16            # what Trainer._autocast uses

LOAD_HW = CPU_HW             # decode + resize to the training resolution
LARGE_JPEG_WH = (2048, 1536)  # PIL's (W, H): big enough for draft to shrink by 8 while decoding
DRAFT_MAX_MEAN_ABS_DIFF = 0.02  # draft decoding may resample differently, never change the content


# ----------------------------------------------------------------------------- helpers

def median_seconds(benchmark) -> float | None:
    """Median seconds per round; ``None`` where timing is off (``--benchmark-disable``, xdist)."""
    return None if benchmark.stats is None else float(benchmark.stats.stats.median)


def record_rate(benchmark, samples_per_round: int, unit: str = "samples") -> float | None:
    """Put ``median_ms`` and ``<unit>_per_sec`` (from the median round) in ``extra_info``."""
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info[f"{unit}_per_sec"] = samples_per_round / median
    return median


def seeded_model(seed: int = 0) -> LensCorrectionModel:
    """A default model initialized from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LensCorrectionModel()


def fixture_batch(rows: pd.DataFrame, batch: int, hw: tuple[int, int]) -> dict:
    """The first ``batch`` pairs through the project's own dataset and loader: images ``(B, 3, H, W)``."""
    dataset = PairDataset(rows.iloc[:batch], resize_hw=hw)
    return next(iter(make_loader(dataset, batch_size=batch, shuffle=False)))


def seeded_warp_inputs(batch: int, hw: tuple[int, int], seed: int = 0):
    """Image ``(B, 3, H, W)``, params ``(B, 8)`` halfway to the bounds, flow ``(B, 2, H/8, W/8)`` (~1 px)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = hw
    image = torch.rand(batch, 3, height, width, generator=generator)
    lo = torch.tensor([b[0] for b in DEFAULT_PARAM_BOUNDS])
    hi = torch.tensor([b[1] for b in DEFAULT_PARAM_BOUNDS])
    identity = identity_params(batch)
    toward = torch.where(torch.rand(batch, 8, generator=generator) < 0.5, lo, hi)
    params = identity + 0.5 * torch.rand(batch, 8, generator=generator) * (toward - identity)
    flow = torch.randn(batch, 2, height // 8, width // 8, generator=generator)
    return image, params, flow


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


@dataclass
class TrainStep:
    """:meth:`Trainer.train_step` on one host batch, callable again and again.

    ``image`` and ``target`` are ``(B, 3, H, W)`` on the host (pinned for CUDA); each call is one
    training step exactly as ``Trainer.fit`` runs it (copy to the device ``non_blocking``, forward,
    backward, clip, optimizer step, instrumentation) and synchronizes CUDA before returning.
    """

    trainer: Trainer
    image: torch.Tensor
    target: torch.Tensor
    records: list[dict] = field(default_factory=list)

    def __call__(self) -> dict:
        record = self.trainer.train_step({"input_image": self.image, "target_image": self.target})
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)
        self.records.append(record)
        return record

    def phase_medians(self, last: int) -> dict[str, float]:
        """Median of each timing field the trainer itself reported over the ``last`` calls."""
        keys = ("timing_forward_ms", "timing_backward_ms", "timing_optim_step_ms", "instrumentation_ms",
                "data_time_ms", "batch_time_ms")
        recent = self.records[-last:]
        return {f"trainer_{key}": statistics.median(r[key] for r in recent) for key in keys if key in recent[-1]}


def build_train_step(rows: pd.DataFrame, stage: str, instrumented: bool, device: torch.device, out_dir: Path, *,
                     batch: int, hw: tuple[int, int], amp: bool, channels_last: bool = False) -> TrainStep:
    """A :class:`Trainer` on ``batch`` fixture pairs at ``hw`` and its :class:`TrainStep`."""
    if channels_last and device.type != "cuda":
        # torch 2.13 CPU (oneDNN): the backward of a strided 1x1 conv (the model's first skip
        # connection) on channels_last tensors segfaults or aborts the whole process.
        raise ValueError(f"channels_last is for CUDA only here, got device {device}")
    config = TrainConfig(stage=stage, epochs=1, amp=amp, channels_last=channels_last, progress=False,
                         debug_instrumentation=instrumented, debug_perf_enabled=instrumented)
    host = fixture_batch(rows, batch, hw)
    image, target = host["input_image"], host["target_image"]
    if device.type == "cuda":
        image, target = image.pin_memory(), target.pin_memory()
    trainer = Trainer(seeded_model(), config, [host], [host], out_dir=out_dir, device=device, log=lambda message: None)
    return TrainStep(trainer, image, target)


def check_train_step(step: TrainStep, record: dict, checksum_before: str, *, batch: int) -> None:
    """The step trained: finite loss, parameters moved, and the instrumentation matched its flags."""
    cfg = step.trainer.config
    assert record["kind"] == "train_step" and record["batch_size"] == batch
    assert math.isfinite(record["loss"]), f"non-finite loss {record['loss']}"
    assert math.isfinite(record["grad_norm_total"]) and record["grad_norm_total"] > 0
    assert step.trainer.parameter_checksum() != checksum_before, "the optimizer step changed no parameter"
    if cfg.debug_instrumentation:
        # The heads' last layers start at zero, so on a first step only they get a gradient
        # (the backbone's is 0); every trained group moves all the same (AdamW's weight decay).
        assert record["grad_norm_param_head"] > 0 and math.isfinite(record["grad_norm_backbone"])
        for group in ("backbone", "param_head"):
            assert record[f"param_delta_{group}"] > 0, f"{group} did not move"
        if step.trainer.spec.residual_active:
            assert record["residual_head_grad_is_zero"] is False
        else:
            assert record["residual_head_grad_is_zero"] is None  # stage 1: branch off, reported as off
    else:
        assert "grad_norm_backbone" not in record and "param_delta_backbone" not in record
    if cfg.debug_perf_enabled:
        assert record["samples_per_sec"] > 0 and record["instrumentation_ms"] >= 0
    else:
        assert "samples_per_sec" not in record


def record_train_step_figures(benchmark, step: TrainStep, medians: dict, *, stage: str, instrumented: bool,
                              batch: int, hw: tuple[int, int], rounds: int) -> None:
    """Settings, samples/sec, the trainer's own phase timings and (on "on") the overhead vs "off"."""
    trainer = step.trainer
    benchmark.extra_info.update({
        "stage": stage, "instrumentation": on_off(instrumented), "batch_size": batch, "height": hw[0],
        "width": hw[1], "device": str(trainer.device), "amp": trainer.amp_enabled,
        "torch_threads": torch.get_num_threads(),
    })
    median = record_rate(benchmark, batch)
    if median is None:
        return
    medians[(trainer.device.type, stage, instrumented)] = median
    if instrumented:
        phases = step.phase_medians(rounds)
        benchmark.extra_info.update(phases)
        benchmark.extra_info["trainer_instrumentation_share_pct"] = (
            100.0 * phases["trainer_instrumentation_ms"] / phases["trainer_batch_time_ms"])
        off = medians.get((trainer.device.type, stage, False))
        if off is not None:
            benchmark.extra_info["instrumentation_overhead_pct"] = 100.0 * (median / off - 1.0)


def train_step_params(prefix: str) -> list:
    """(stage, instrumented) pairs, "off" before "on", grouped per stage so each pair prints together."""
    return [pytest.param(stage, instrumented, id=f"{stage}-instrumentation_{on_off(instrumented)}",
                         marks=pytest.mark.benchmark(group=f"{prefix}[{stage}]"))
            for stage in STAGES for instrumented in (False, True)]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fixture_rows(fixture_root: Path) -> pd.DataFrame:
    """The embedded fixture pairs (256x256 JPEGs), one row per pair."""
    return scan_pairs(fixture_root)


@pytest.fixture(scope="module")
def step_medians() -> dict:
    """Median seconds per step by ``(device type, stage, instrumented)``, shared by this module's tests."""
    return {}


@pytest.fixture(scope="module")
def large_jpeg_rows(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """One pair of 2048x1536 (W x H) JPEGs: scikit-image's astronaut upscaled, the target mirrored."""
    folder = tmp_path_factory.mktemp("large_jpeg")
    picture = Image.fromarray(skimage_data.astronaut()).resize(LARGE_JPEG_WH, Image.Resampling.BICUBIC)
    picture.save(folder / "astronaut_original.jpg", quality=90)
    picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "astronaut_generated.jpg", quality=90)
    return scan_pairs(folder)


@pytest.fixture
def cuda_device():
    """``cuda`` with the settings of a GPU run (cudnn autotuning), peak-memory counters reset."""
    device = torch.device("cuda")
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    yield device
    torch.backends.cudnn.benchmark = previous


def record_cuda_memory(benchmark, device: torch.device) -> None:
    mib = 1024.0 ** 2
    benchmark.extra_info.update({
        "gpu_name": torch.cuda.get_device_name(device),
        "cuda_max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / mib,
        "cuda_max_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / mib,
        "cuda_memory_allocated_mb": torch.cuda.memory_allocated(device) / mib,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    })


# ----------------------------------------------------------------------------- training step (CPU)

@pytest.mark.parametrize("stage,instrumented", train_step_params("train_step_cpu"))
def test_train_step_cpu(benchmark, fixture_rows, step_medians, tmp_path, stage, instrumented):
    """One step on batch 8 at 128x128 (images ``(8, 3, 128, 128)``), instrumentation+perf on or off."""
    step = build_train_step(fixture_rows, stage, instrumented, torch.device("cpu"), tmp_path,
                            batch=CPU_BATCH, hw=CPU_HW, amp=False)
    before = step.trainer.parameter_checksum()
    record = benchmark.pedantic(step, rounds=CPU_STEP_ROUNDS, warmup_rounds=CPU_STEP_WARMUP, iterations=1)
    check_train_step(step, record, before, batch=CPU_BATCH)
    record_train_step_figures(benchmark, step, step_medians, stage=stage, instrumented=instrumented,
                              batch=CPU_BATCH, hw=CPU_HW, rounds=CPU_STEP_ROUNDS)


# ----------------------------------------------------------------------------- warp and proxy (CPU)

def check_warp(result, image: torch.Tensor) -> None:
    """Shapes ``(B, 3, H, W)`` / ``(B, H, W, 2)``, finite, the image moved and the residual was fused."""
    batch, _, height, width = image.shape
    assert result.prediction.shape == image.shape
    assert result.final_grid.shape == result.param_grid.shape == (batch, height, width, 2)
    assert torch.isfinite(result.prediction).all() and torch.isfinite(result.final_grid).all()
    assert (result.prediction.float() - image.float()).abs().mean() > 1e-3, "the warp left the image unchanged"
    assert (result.final_grid - result.param_grid).abs().max() > 0, "the residual flow was not fused"


@pytest.mark.benchmark(group="warp")
def test_warp_cpu(benchmark):
    """``apply_correction`` on ``(8, 3, 256, 256)`` with params ``(8, 8)`` and flow ``(8, 2, 32, 32)``."""
    image, params, flow = seeded_warp_inputs(WARP_BATCH, WARP_HW)
    result = benchmark.pedantic(apply_correction, args=(image, params, flow), rounds=20, warmup_rounds=2,
                                iterations=1)
    check_warp(result, image)
    benchmark.extra_info.update({"batch_size": WARP_BATCH, "height": WARP_HW[0], "width": WARP_HW[1],
                                 "device": "cpu", "torch_threads": torch.get_num_threads()})
    record_rate(benchmark, WARP_BATCH, unit="images")


@pytest.mark.benchmark(group="proxy")
def test_proxy_score_per_pair_256(benchmark, fixture_rows):
    """``proxy_score`` of one fixture pair at 256x256: distorted input ``(3, 256, 256)`` vs its target."""
    pair = PairDataset(fixture_rows.iloc[:1], resize_hw=(256, 256))[0]
    pred, target = pair["input_image"], pair["target_image"]
    scores = benchmark.pedantic(proxy_score, args=(pred, target), rounds=10, warmup_rounds=1, iterations=1)
    assert set(scores) == set(SCORE_KEYS)
    assert all(0.0 <= scores[key] <= 1.0 for key in SCORE_KEYS if key != "hard_fail")
    perfect = proxy_score(target, target)
    assert perfect["total"] > scores["total"], "the proxy ranks the distorted input above a perfect prediction"
    benchmark.extra_info.update({"height": 256, "width": 256, "total": scores["total"]})
    record_rate(benchmark, 1, unit="pairs")


# ----------------------------------------------------------------------------- data loading (CPU)

def cycling_loader(dataset: PairDataset) -> Callable[[], dict]:
    """A callable returning ``dataset[0]``, ``dataset[1]``, ... and round again: one sample per call."""
    indices = itertools.cycle(range(len(dataset)))
    return lambda: dataset[next(indices)]


def check_sample_against_other_mode(sample: dict, dataset: PairDataset) -> None:
    """``(3, H, W)`` float32 in [0, 1], and within a small mean difference of the other draft mode."""
    assert sample["input_image"].shape == sample["target_image"].shape == (3, *LOAD_HW)
    assert sample["input_image"].dtype == torch.float32
    assert 0.0 <= float(sample["input_image"].min()) and float(sample["input_image"].max()) <= 1.0
    rows = pd.DataFrame({"image_id": dataset.image_ids, "input_path": dataset.input_paths,
                         "target_path": dataset.target_paths})
    other = PairDataset(rows, resize_hw=dataset.resize_hw, draft=not dataset.draft)
    reference = other[dataset.image_ids.index(sample["image_id"])]
    for key in ("input_image", "target_image"):
        diff = float((sample[key] - reference[key]).abs().mean())
        assert diff < DRAFT_MAX_MEAN_ABS_DIFF, f"{key}: draft on vs off differ by {diff:.4f} on average"


def benchmark_loading(benchmark, rows: pd.DataFrame, draft: bool, rounds: int, source: str) -> None:
    dataset = PairDataset(rows, resize_hw=LOAD_HW, draft=draft)
    sample = benchmark.pedantic(cycling_loader(dataset), rounds=rounds, warmup_rounds=min(8, len(dataset)),
                                iterations=1)
    check_sample_against_other_mode(sample, dataset)
    benchmark.extra_info.update({"source": source, "draft": on_off(draft), "resize_h": LOAD_HW[0],
                                 "resize_w": LOAD_HW[1], "decodes_per_sample": 2})
    record_rate(benchmark, 1)


@pytest.mark.benchmark(group="load_sample[fixtures 256x256 -> 128x128]")
@pytest.mark.parametrize("draft", [True, False], ids=["draft_on", "draft_off"])
def test_load_sample_fixtures(benchmark, fixture_rows, draft):
    """``PairDataset[i]`` (input + target) over every fixture pair, one sample per round."""
    benchmark_loading(benchmark, fixture_rows, draft, rounds=len(fixture_rows), source="fixtures/pairs")


@pytest.mark.benchmark(group="load_sample[jpeg 2048x1536 -> 128x128]")
@pytest.mark.parametrize("draft", [True, False], ids=["draft_on", "draft_off"])
def test_load_sample_large_jpeg(benchmark, large_jpeg_rows, draft):
    """``PairDataset[0]`` on a pair of 2048x1536 JPEGs, where draft decoding shrinks by 8 first."""
    benchmark_loading(benchmark, large_jpeg_rows, draft, rounds=10, source="2048x1536 jpeg")


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("stage,instrumented", train_step_params("train_step_cuda"))
def test_train_step_cuda(benchmark, fixture_rows, step_medians, tmp_path, cuda_device, stage, instrumented):
    """One step on batch 16 at 256x256, as a GPU run trains: bf16 autocast, cudnn.benchmark,
    channels_last model and inputs, pinned host batch copied ``non_blocking``; synchronized per call."""
    step = build_train_step(fixture_rows, stage, instrumented, cuda_device, tmp_path, batch=GPU_BATCH,
                            hw=GPU_HW, amp=True, channels_last=True)
    assert step.trainer.amp_enabled
    assert step.trainer.core.backbone.stages[0][0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    before = step.trainer.parameter_checksum()
    record = benchmark.pedantic(step, rounds=GPU_STEP_ROUNDS, warmup_rounds=GPU_STEP_WARMUP, iterations=1)
    check_train_step(step, record, before, batch=GPU_BATCH)
    record_train_step_figures(benchmark, step, step_medians, stage=stage, instrumented=instrumented,
                              batch=GPU_BATCH, hw=GPU_HW, rounds=GPU_STEP_ROUNDS)
    benchmark.extra_info.update({"amp_dtype": str(GPU_AMP_DTYPE), "channels_last": True, "pinned_non_blocking": True})
    record_cuda_memory(benchmark, cuda_device)


@pytest.mark.gpu
@pytest.mark.benchmark(group="warp")
def test_warp_cuda(benchmark, cuda_device):
    """``apply_correction`` on CUDA, ``(8, 3, 256, 256)`` channels_last under bf16 autocast; synchronized."""
    image, params, flow = (t.to(cuda_device) for t in seeded_warp_inputs(WARP_BATCH, WARP_HW))
    image = image.contiguous(memory_format=torch.channels_last)

    def warp_synchronized():
        with torch.autocast(device_type="cuda", dtype=GPU_AMP_DTYPE):
            result = apply_correction(image, params, flow)
        torch.cuda.synchronize(cuda_device)
        return result

    result = benchmark.pedantic(warp_synchronized, rounds=50, warmup_rounds=5, iterations=1)
    check_warp(result, image)
    benchmark.extra_info.update({"batch_size": WARP_BATCH, "height": WARP_HW[0], "width": WARP_HW[1],
                                 "device": str(cuda_device), "amp_dtype": str(GPU_AMP_DTYPE), "channels_last": True})
    record_rate(benchmark, WARP_BATCH, unit="images")
    record_cuda_memory(benchmark, cuda_device)


# ----------------------------------------------------------------------------- time to a verdict (CPU)

#: A probe of seconds: 8 pairs at 64x64, batch 4, one epoch (2 steps), judged, no figures.
VERDICT_OVERRIDES = {"data.num_pairs": 8, "data.batch_size": 4, "data.resize_hw": [64, 64]}


@pytest.mark.benchmark(group="verdict")
def test_time_to_verdict_stage2_probe_small(benchmark, tmp_path):
    """``run_debug_mode("stage2_probe")`` in-process on a small config: set-up, 2 steps, validation,
    judging, report (no figures). ``scripts/bench_verdict.py`` times the whole command; this one is
    here so ``--benchmark-compare`` can flag a slower verdict against a saved run."""
    from autohdr.runs.debug import run_debug_mode

    runs = iter(range(1000))

    def verdict():
        return run_debug_mode("stage2_probe", out_dir=tmp_path / f"run{next(runs)}", device="cpu", epochs=1,
                              overrides=dict(VERDICT_OVERRIDES), plots=False, log=lambda message: None)

    report = benchmark.pedantic(verdict, rounds=3, warmup_rounds=1, iterations=1)
    assert report["verdicts"] and report["error"] is None and report["stopped_early"] is None
    assert report["figures"]["steps"] == 2
    parts = report["timings"]["parts_s"]
    benchmark.extra_info.update({f"{part}_s": seconds for part, seconds in parts.items()})
