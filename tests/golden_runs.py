"""Short seeded runs whose ``metrics.jsonl`` records are pinned in ``tests/data/golden_metrics.json``.

The diagnosis layer was split into observers (``autohdr/diagnosis/observers/``) without changing a
single record: ``scripts/make_golden_metrics.py`` ran these runs on the code *before* the split and
stored every record (minus its wall-clock fields) in the fixture; ``tests/test_observers.py`` runs
them again and compares every record, key by key and in order.

Why a fixture and not Trainer vs hand loop vs attach against each other: those three loops do not
write the same numbers (the hand loop has no schedule, the attached competition loop has its own
loss, bf16 autocast and per-group learning rates), so comparing them only checks that they agree
where they happen to, never that a refactor left a record alone. The fixture is the record itself.

The runs (each a few seconds on one CPU thread; together they touch every kind of record and every
observer):

* ``trainer_stage2``: the Trainer on the test config (3 epochs x 2 steps, 64x64, tiny model).
* ``trainer_zeroed_perf_off``: the same with the residual zeroed (``residual_inactive`` warnings)
  and ``debug_perf_enabled`` off.
* ``trainer_instrumentation_off``: perf fields only (what a run without instrumentation writes).
* ``trainer_out_of_range`` / ``trainer_nan_input``: a batch with values outside [0, 1] (named by
  ``batch_bad_sample``), and one with a NaN pixel (the ``error`` record and its batch fields).
* ``hand_overfit_stage1``: ``tests/hand_loop.py::train_by_hand`` on ``overfit_stage1`` at 8 pairs,
  64x64, 2 epochs: train == val (the epoch accumulators), ground truth and the constant lens.
* ``hand_two_ranks``: a hand loop told it is rank 0 of 2 (``all_gather_object`` answered
  in-process): ``rank_param_checksums`` / ``rank_probe_checksums`` and the global batch size.
* ``attach_competition``: ``tests/competition_loop.py`` through ``autohdr.attach``, 2 epochs.

Floats are only bit-reproducible on the same software and CPU kind, so the fixture stores where
it was made (:func:`environment`); elsewhere the test checks the records' structure (kinds, keys,
types) and says why it left the values out. A run under bf16 autocast (:data:`BF16_RUNS`) also
depends on the CPU's bf16 instructions (oneDNN picks its bf16 kernels by them: the attached loop's
second step differs in the 5th digit between a CPU with and one without ``avx512_bf16``, and again
under ``ONEDNN_MAX_CPU_ISA=AVX2``), so its environment names them too and is stored per run.
"""

from __future__ import annotations

import json
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

FIXTURE = Path(__file__).parent / "data" / "golden_metrics.json"
#: overfit_stage1 at 8 pairs, 64x64, 2 epochs, pinned (an edit of the mode's preset leaves it alone)
HAND_PRESET = Path(__file__).parent / "data" / "golden_overfit_stage1.toml"

#: Wall-clock fields (values differ between two identical runs): left out of the fixture.
CLOCK_FIELDS = ("data_time_ms", "timing_forward_ms", "timing_backward_ms", "timing_optim_step_ms",
                "batch_time_ms", "samples_per_sec", "instrumentation_ms", "unaccounted_ms", "warmup_wall_ms",
                "step_time_ms_mean", "instrumentation_overhead_frac", "cuda_mem_allocated_mb",
                "cuda_mem_reserved_mb", "max_cuda_mem_allocated_mb")


def strip_clock(record: dict) -> dict:
    """``record`` without its wall-clock fields (``*_ms_mean`` included), key order kept."""
    return {k: v for k, v in record.items() if k not in CLOCK_FIELDS and not k.endswith("_ms_mean")}


def read_records(run_dir: Path) -> list[dict]:
    text = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [strip_clock(json.loads(line)) for line in text.splitlines() if line.strip()]


#: Runs under bf16 autocast: their floats also depend on the CPU's bf16 instructions.
BF16_RUNS = frozenset({"attach_competition"})
#: The CPU flags oneDNN's bf16 kernels are chosen by (Linux /proc/cpuinfo names).
BF16_CPU_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_bf16_flags() -> str:
    """The CPU's bf16-related flags, comma-joined (``"none"``; ``"unknown"`` without /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    return ",".join(flag for flag in BF16_CPU_FLAGS if flag in flags) or "none"


def environment(run_name: str | None = None) -> dict[str, str]:
    """What bit-exact floats depend on: the libraries that compute them and the CPU's vector ISA
    (and, for a run of :data:`BF16_RUNS`, its bf16 instructions)."""
    import numpy
    import skimage
    here = {"torch": torch.__version__, "numpy": numpy.__version__, "scikit-image": skimage.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}
    if run_name in BF16_RUNS:
        here["cpu_bf16_flags"] = cpu_bf16_flags()
    return here


def stored_environment(golden: dict, run_name: str) -> dict[str, str]:
    """Where the fixture's ``run_name`` was made: its own entry in ``run_environments`` if it has
    one, else the fixture's ``environment``."""
    return golden.get("run_environments", {}).get(run_name, golden["environment"])


@contextmanager
def one_thread():
    """One intra-op thread: the reduction order (and so every float) does not depend on the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the runs

def trainer_stage2(out_dir: Path) -> None:
    from tests.helpers_trainer import config, train
    train(out_dir, config("stage2_hybrid", debug_residual_inactive_threshold_px=0.01,
                          debug_residual_inactive_patience=3))


def trainer_zeroed_perf_off(out_dir: Path) -> None:
    from tests import faults
    from tests.helpers_trainer import config, seeded, train
    train(out_dir, config("stage2_hybrid", debug_perf_enabled=False, debug_residual_inactive_threshold_px=0.01,
                          debug_residual_inactive_patience=3), seeded(faults.ZeroedResidual))


def trainer_instrumentation_off(out_dir: Path) -> None:
    from tests.helpers_trainer import config, train
    train(out_dir, config("stage2_hybrid", epochs=2, debug_instrumentation=False))


def _bad_batches(value: float) -> list[dict]:
    """The fixture batches with ``value`` written into sample 1 of batch 1 (input) and sample 2 (target)."""
    from tests.helpers_trainer import fixture_batches
    batches = fixture_batches()
    bad = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batches[1].items()}
    bad["input_image"][1, 0, :4, :4] = value
    bad["target_image"][2, 1, 5, 5] = value
    return [batches[0], bad]


def trainer_out_of_range(out_dir: Path) -> None:
    """A batch with values outside [0, 1]: ``batch_bad_sample`` names it, training goes on."""
    from tests.helpers_trainer import config, train
    train(out_dir, config("stage2_hybrid", epochs=2), train_loader=_bad_batches(1.75))


def trainer_nan_input(out_dir: Path) -> None:
    """A NaN pixel in the second batch: the loss is not finite, the error record names the sample."""
    from autohdr.training.trainer import NonFiniteLossError
    from tests.helpers_trainer import config, train
    try:
        train(out_dir, config("stage2_hybrid", epochs=1), train_loader=_bad_batches(float("nan")))
    except NonFiniteLossError:
        return
    raise AssertionError("a NaN input should have stopped the run")


def hand_overfit_stage1(out_dir: Path) -> None:
    from tests.hand_loop import train_by_hand
    train_by_hand(out_dir, str(HAND_PRESET))


def hand_two_ranks(out_dir: Path) -> None:
    """Rank 0 of a pretend two-rank job: every gathered value comes back once per rank."""
    from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig
    from autohdr.diagnosis.ranks import DistContext
    from autohdr.lens.evaluation import correct
    from tests.helpers_trainer import config, fixture_batches, seeded

    def gather(out: list, value: Any, group=None) -> None:
        out[:] = [value] * len(out)

    cfg = config("stage2_hybrid", epochs=2)
    model, batches = seeded(), fixture_batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    with mock.patch("torch.distributed.all_gather_object", gather):
        hooks = Instrumentation(model, optimizer, out_dir, stage=cfg.stage, dist=DistContext(rank=0, world_size=2),
                                config=InstrumentationConfig.from_train_config(cfg), log=lambda message: None)
        hooks.on_train_start(batches)
        for epoch in range(cfg.epochs):
            hooks.on_train_epoch_start(epoch)
            model.train()
            for batch in batches:
                hooks.on_train_batch_start(batch)
                correction = correct(model, batch["input_image"], True)
                hooks.on_after_forward()
                loss, parts = hooks.loss_fn(correction, batch["target_image"])
                optimizer.zero_grad()
                loss.backward()
                hooks.on_after_backward()
                optimizer.step()
                hooks.on_train_batch_end(loss, correction, components=parts)
            hooks.on_validation(batches, final=epoch == cfg.epochs - 1)
            hooks.on_train_epoch_end()
        hooks.on_train_end()


def attach_competition(out_dir: Path) -> None:
    from autohdr.data.settings import default_fixture_root
    from autohdr.runs.debug import build_loaders, select_rows
    from autohdr.runs.presets import DataPreset
    from tests.competition_loop import run_competition_loop
    data = DataPreset(num_pairs=8, overfit=True, resize_hw=(64, 64), batch_size=4, num_workers=0, hflip=False)
    train_rows, val_rows = select_rows(default_fixture_root(), data)
    run_competition_loop(out_dir, *build_loaders(train_rows, val_rows, data, 0), epochs=2)


RUNS: dict[str, Callable[[Path], None]] = {
    "trainer_stage2": trainer_stage2,
    "trainer_zeroed_perf_off": trainer_zeroed_perf_off,
    "trainer_instrumentation_off": trainer_instrumentation_off,
    "trainer_out_of_range": trainer_out_of_range,
    "trainer_nan_input": trainer_nan_input,
    "hand_overfit_stage1": hand_overfit_stage1,
    "hand_two_ranks": hand_two_ranks,
    "attach_competition": attach_competition,
}


def run(name: str, out_dir: Path) -> list[dict]:
    """Run ``name`` seeded on one thread into ``out_dir``; its records without clock fields."""
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        RUNS[name](Path(out_dir))
    return read_records(out_dir)


# ----------------------------------------------------------------------------- comparing

def _type(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def structure(records: list[dict]) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Each record's kind and its keys with the JSON type of each value (values left out)."""
    return [(r["kind"], tuple((k, _type(v)) for k, v in r.items())) for r in records]


def differences(expected: list[dict], actual: list[dict], *, values: bool = True) -> list[str]:
    """Where two runs' records differ: a record missing or extra, a key missing, extra or out of
    order, a value (NaN equals NaN; ``values=False``: the JSON type only). Empty when the same."""
    out = []
    if [r["kind"] for r in expected] != [r["kind"] for r in actual]:
        out.append(f"kinds differ: expected {[r['kind'] for r in expected]}, got {[r['kind'] for r in actual]}")
        return out
    for index, (want, got) in enumerate(zip(expected, actual)):
        where = f"record {index} ({want['kind']}, step {want.get('step')})"
        if list(want) != list(got):
            missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
            out.append(f"{where}: keys missing {missing}, extra {extra}" if missing or extra
                       else f"{where}: keys in another order")
        for key in want.keys() & got.keys():
            a, b = want[key], got[key]
            same = (_same(a, b) if values else _type(a) == _type(b))
            if not same:
                out.append(f"{where}: {key}: expected {a!r}, got {b!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b
