"""Tiny trainer runs for tests/test_trainer.py: fixture batches, small seeded models, run and read back.

A run here is the real :class:`autohdr.training.trainer.Trainer` on plain lists of batch dicts decoded once
from the embedded fixture pairs (8 pairs at 64x64, batches of 4: two steps per epoch), with a
small :class:`LensCorrectionModel` (three backbone stages) so that a three-epoch run takes well
under a second on one CPU core. ``metrics.jsonl`` is read back with ``pandas.read_json(lines=True)``,
as a user would read it.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd
import torch
import torch.nn as nn

from autohdr.training.config import TrainConfig
from autohdr.data import PairDataset, scan_pairs
from autohdr.lens.geometry import IDENTITY_PARAMS
from autohdr.lens.losses import LossWeights
from autohdr.lens.model import LensCorrectionModel, ModelConfig
from autohdr.data.settings import default_fixture_root
from autohdr.training.trainer import Trainer, TrainResult

NUM_PAIRS, HW, BATCH = 8, (64, 64), 4
STEPS_PER_EPOCH = NUM_PAIRS // BATCH

#: A small model: 64x64 inputs, residual flow at 16x16 (stride 4).
TINY_MODEL = ModelConfig(widths=(8, 16, 16), groups=4, head_hidden=16, residual_hidden=8, residual_stride=4)

#: Loss weights that differ from the defaults and from each other, so a mix-up of weights shows.
TEST_WEIGHTS = LossWeights(pixel=1.5, ssim=0.7, edge=0.3, grad_orient=0.2, multiscale=0.4,
                           flow_tv=0.11, flow_mag=0.13, flow_curv=0.17, jacobian=1.9)

#: Every field of the trainer's per-step timing (debug_perf_enabled).
PERF_FIELDS = ("data_time_ms", "timing_forward_ms", "timing_backward_ms", "timing_optim_step_ms",
               "batch_time_ms", "samples_per_sec")
#: Fields whose values are wall-clock measurements (never equal between two runs).
CLOCK_FIELDS = PERF_FIELDS + ("instrumentation_ms", "unaccounted_ms", "warmup_wall_ms", "step_time_ms_mean",
                              "instrumentation_overhead_frac")


@functools.lru_cache(maxsize=None)
def _samples() -> tuple[dict, ...]:
    rows = scan_pairs(default_fixture_root()).iloc[:NUM_PAIRS].reset_index(drop=True)
    dataset = PairDataset(rows, resize_hw=HW)
    return tuple(dataset[i] for i in range(len(dataset)))


def fixture_batches() -> list[dict]:
    """The fixture pairs as a plain list of batch dicts (``input_image`` ``(B, 3, H, W)``, ...)."""
    samples = _samples()
    return [_collate(list(samples[start:start + BATCH])) for start in range(0, len(samples), BATCH)]


def seeded(cls: type[nn.Module] = LensCorrectionModel, seed: int = 0, **kwargs) -> nn.Module:
    """``cls(TINY_MODEL)`` initialized from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if issubclass(cls, LensCorrectionModel):
            return cls(TINY_MODEL, **kwargs)
        return cls(**kwargs)


def config(stage: str = "stage2_hybrid", **changes: Any) -> TrainConfig:
    """A test TrainConfig: 3 epochs, everything instrumented, one warm-up step, no progress bar."""
    base = TrainConfig(stage=stage, epochs=3, lr=3e-3, progress=False, loss_weights=TEST_WEIGHTS,
                       debug_instrumentation=True, debug_perf_enabled=True, debug_perf_warmup_steps=1,
                       debug_probe_max_samples=4, log_interval=1000)
    return replace(base, **changes)


@dataclass
class Run:
    """A finished (or failed) run: the trainer, its result, its folder and its history."""

    trainer: Trainer
    result: TrainResult | None
    out_dir: Path

    @property
    def history(self) -> pd.DataFrame:
        return read_history(self.out_dir)

    def records(self) -> list[dict]:
        """The raw JSON objects, one per line (to see which keys a record really has)."""
        return read_records(self.out_dir)

    def kind(self, kind: str) -> pd.DataFrame:
        frame = self.history
        return frame[frame["kind"] == kind].reset_index(drop=True)


#: How to read ``metrics.jsonl`` with pandas without losing anything: ``precise_float`` keeps the
#: last digits of every float (the default parser rounds some), ``dtype=False`` keeps checksum
#: strings as strings (the default turns an all-digit checksum into an integer).
PANDAS_READ = {"lines": True, "precise_float": True, "dtype": False}


def read_history(out_dir: Path) -> pd.DataFrame:
    return pd.read_json(Path(out_dir) / "metrics.jsonl", **PANDAS_READ)


def read_records(out_dir: Path) -> list[dict]:
    text = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_trainer(out_dir: Path, cfg: TrainConfig, model: nn.Module | None = None,
                 train: Iterable[Mapping] | None = None, val: Iterable[Mapping] | None = None) -> Trainer:
    model = model if model is not None else seeded()
    batches = fixture_batches()
    return Trainer(model, cfg, train if train is not None else batches, val if val is not None else batches,
                   out_dir=out_dir, device="cpu", log=lambda message: None)


def train(out_dir: Path, cfg: TrainConfig, model: nn.Module | None = None, *,
          train_loader: Iterable[Mapping] | None = None, val_loader: Iterable[Mapping] | None = None,
          **fit_kwargs: Any) -> Run:
    trainer = make_trainer(out_dir, cfg, model, train_loader, val_loader)
    result = trainer.fit(**fit_kwargs)
    return Run(trainer, result, Path(out_dir))


class FailingLoader:
    """The fixture batches, raising ``error`` at batch ``at_batch`` of its ``at_epoch``-th pass (from 0)."""

    def __init__(self, batches: list[dict], error: BaseException, at_epoch: int, at_batch: int) -> None:
        self.batches, self.error = batches, error
        self.at_epoch, self.at_batch = at_epoch, at_batch
        self.passes = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        current, self.passes = self.passes, self.passes + 1
        for index, batch in enumerate(self.batches):
            if current == self.at_epoch and index == self.at_batch:
                raise self.error
            yield batch


class SignalingLoader:
    """A real multi-process ``DataLoader`` over the fixture pairs (the same batches as
    :func:`fixture_batches`) that sends ``signum`` to this process while it fetches batch
    ``at_batch`` of its ``at_epoch``-th pass: the signal lands inside the DataLoader's own code,
    as a Ctrl-C or a scheduler's SIGTERM does."""

    def __init__(self, signum: int, at_epoch: int, at_batch: int, num_workers: int = 2) -> None:
        self.loader = torch.utils.data.DataLoader(list(_samples()), batch_size=BATCH, shuffle=False,
                                                  num_workers=num_workers, collate_fn=_collate)
        self.signum, self.at_epoch, self.at_batch = signum, at_epoch, at_batch
        self.passes = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        current, self.passes = self.passes, self.passes + 1
        iterator = iter(self.loader)
        for index in range(len(self.loader)):
            if current == self.at_epoch and index == self.at_batch:
                os.kill(os.getpid(), self.signum)
            yield next(iterator)


def _collate(samples: list[dict]) -> dict:
    return {"input_image": torch.stack([s["input_image"] for s in samples]),
            "target_image": torch.stack([s["target_image"] for s in samples]),
            "image_id": [s["image_id"] for s in samples]}


class GlobalParamsOnly(nn.Module):
    """A user's own model: no ``backbone`` / heads naming, no residual output, only ``params``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.to_params = nn.Linear(8, 8)
        nn.init.zeros_(self.to_params.weight)
        nn.init.zeros_(self.to_params.bias)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = torch.relu(self.features(image)).mean(dim=(2, 3))
        identity = pooled.new_tensor(IDENTITY_PARAMS)
        return {"params": identity + 0.05 * torch.tanh(self.to_params(pooled))}


class NaNAfter(LensCorrectionModel):
    """Healthy for ``good_steps`` training forwards, then returns NaN parameters."""

    def __init__(self, config: ModelConfig | None = None, good_steps: int = 2) -> None:
        super().__init__(config)
        self.good_steps = good_steps
        self.training_calls = 0

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        if self.training:
            self.training_calls += 1
            if self.training_calls > self.good_steps:
                return {**out, "params": out["params"] * float("nan")}
        return out


def expected_warning_steps(steps: pd.Series, contrib: pd.Series, threshold: float, patience: int) -> list[int]:
    """Reference for the inactivity warning: the steps at which ``patience`` consecutive contributions
    below ``threshold`` complete (the count restarts after each warning and at every active step)."""
    fired, run = [], 0
    for step, value in zip(steps, contrib):
        run = run + 1 if value < threshold else 0
        if run == patience:
            fired.append(int(step))
            run = 0
    return fired
