"""A judged debug run of the user's pipeline: autohdr's Trainer, or the user's own loop.

:func:`make_run` trains ``mode`` once into a folder and leaves ``report.json`` there (verdicts and
likely causes); :func:`load_run` reads it back as a :class:`JudgedRun`. With ``train`` configured,
the user's ``train(run_dir, settings)`` runs instead of the Trainer and the plugin judges the
``metrics.jsonl`` it wrote (``autohdr.diagnosis.verdicts.judge`` + ``causes.diagnose``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
import torch.nn as nn

from autohdr.diagnosis.causes import Diagnosis, diagnose
from autohdr.diagnosis.hooks import InstrumentationConfig
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.runs.presets import DebugPreset
from autohdr.diagnosis.verdicts import Verdict, all_good, judge
from autohdr.testing.config import PluginConfig


@dataclass(frozen=True)
class RunSettings:
    """What a user's ``train(run_dir, settings)`` gets: the mode's preset (after overrides) and its data.

    ``train_split`` / ``val_split`` are autohdr split CSVs (``image_id, input_path, target_path``;
    the same rows in the overfit modes); :meth:`loaders` builds autohdr's loaders from them, yielding
    ``{"input_image", "target_image": (B, 3, H, W) in [0, 1], "image_id"}``.
    """

    mode: str
    preset: DebugPreset
    data_root: Path
    train_split: Path
    val_split: Path
    model_factory: Callable[[], nn.Module]
    groups: Mapping[str, Any] | None
    seed: int
    device: torch.device

    @property
    def stage(self) -> str:
        return self.preset.train.stage

    @property
    def residual_active(self) -> bool:
        return self.preset.train.spec.residual_active

    @property
    def peak_lr(self) -> float:
        """The preset's learning rate at its stage's scale (what autohdr's Trainer peaks at)."""
        return self.preset.train.lr * self.preset.train.spec.lr_scale

    @property
    def instrumentation(self) -> InstrumentationConfig:
        return InstrumentationConfig.from_train_config(self.preset.train)

    @property
    def intent(self) -> str:
        """What the run is for, as ``autohdr.attach(intent=...)`` takes it: ``overfit`` (train == val) or ``probe``."""
        return "overfit" if self.mode.startswith("overfit") else "probe"

    @property
    def attach_options(self) -> dict[str, Any]:
        """The mode's ``stage``, ``groups``, ``intent``, instrumentation ``config``, ``judge_config``
        and (where the data root has ``ground_truth.csv``) ``ground_truth`` for ``autohdr.attach``:
        ``autohdr.attach(model, optimizer, run_dir, ..., **settings.attach_options)`` records what
        the plugin judges, so ``autohdr judge run_dir`` agrees with the signal tests."""
        from autohdr.runs.debug import load_ground_truth

        return {"stage": self.stage, "groups": self.groups, "intent": self.intent, "config": self.instrumentation,
                "judge_config": dataclasses.asdict(self.preset.judge), "ground_truth": load_ground_truth(self.data_root)}

    def build_model(self) -> nn.Module:
        """The user's model, built after seeding torch with :attr:`seed` (as the debug modes do)."""
        torch.manual_seed(self.seed)
        return self.model_factory()

    def loaders(self):
        """autohdr's ``(train_loader, val_loader)`` for the split files, at the preset's size and batch."""
        from autohdr.data import read_split_csv
        from autohdr.runs.debug import build_loaders

        return build_loaders(read_split_csv(self.train_split), read_split_csv(self.val_split),
                             self.preset.data, self.seed)


@dataclass
class JudgedRun:
    """A finished, judged run: ``report`` (``report.json``), its verdicts, likely causes and metrics."""

    mode: str
    out_dir: Path
    report: dict[str, Any]
    verdicts: list[Verdict]
    diagnoses: list[Diagnosis]
    history: pd.DataFrame = field(repr=False)

    def verdict(self, signal: str) -> Verdict:
        for item in self.verdicts:
            if item.signal == signal:
                return item
        raise KeyError(f"the {self.mode} run has no verdict for {signal!r}")

    def cause_of(self, signal: str) -> Diagnosis | None:
        """The likely cause that explains ``signal`` (``None`` when it is not BAD)."""
        return next((d for d in self.diagnoses if signal in d.signals), None)


def resolve_callable(spec: str, key: str, base_dir: Path) -> Callable:
    """``MODULE:FUNCTION``, importable as installed or from ``base_dir`` (the pyproject's folder)."""
    module_name, func_name = spec.split(":", 1)
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{key}: cannot import module {module_name!r} from {base_dir} ({exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{key}: module {module_name!r} has no callable {func_name!r}")
    return func


def checked_factory(config: PluginConfig) -> Callable[[], nn.Module]:
    """The model factory; what it returns is checked to be an ``nn.Module``."""
    factory = resolve_callable(config.model_factory, "model_factory", config.base_dir)

    def build() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"[tool.autohdr] model_factory {config.model_factory} returned "
                             f"{type(model).__name__}, expected a torch.nn.Module")
        return model
    return build


def data_root_of(config: PluginConfig) -> Path:
    from autohdr.data.settings import default_fixture_root

    return config.data_root or default_fixture_root()


def stat_tree(root: Path) -> list[tuple[str, int, int]]:
    """Relative path, size and mtime of every file under ``root`` (cheap: no file is read)."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def make_run(config: PluginConfig, mode: str, out_dir: Path) -> None:
    """Train ``mode`` into ``out_dir`` and write its judged ``report.json``; the data root must not change."""
    root = data_root_of(config)
    before = stat_tree(root)
    if config.train:
        _user_loop_run(config, mode, out_dir, root)
    else:
        _trainer_run(config, mode, out_dir, root)
    if stat_tree(root) != before:
        raise RuntimeError(f"the {mode} run changed files under the data root {root} (the dataset must stay as it was)")


def _trainer_run(config: PluginConfig, mode: str, out_dir: Path, root: Path) -> None:
    from autohdr.runs.debug import run_debug_mode

    build = checked_factory(config)
    torch.manual_seed(config.seed)  # the model's initial weights depend on the seed, as in `autohdr debug`
    run_debug_mode(mode, model=build(), data_root=root, groups=config.groups, overrides=config.mode_overrides(mode),
                   out_dir=out_dir, device=config.device, seed=config.seed, plots=False, log=lambda message: None)


def _user_loop_run(config: PluginConfig, mode: str, out_dir: Path, root: Path) -> None:
    from autohdr import data as data_mod
    from autohdr.runs.debug import preset_reference_lr, resolve_device, resolve_preset, select_rows

    started = time.perf_counter()
    preset = resolve_preset(mode, config.mode_overrides(mode))
    train_rows, val_rows = select_rows(root, preset.data)
    splits = out_dir / "splits"
    splits.mkdir()
    train_csv, val_csv = (data_mod.write_split_csv(rows, splits / name)
                          for rows, name in ((train_rows, "train_split.csv"), (val_rows, "val_split.csv")))
    settings = RunSettings(mode=mode, preset=preset, data_root=root, train_split=train_csv, val_split=val_csv,
                           model_factory=checked_factory(config), groups=config.groups, seed=config.seed,
                           device=resolve_device(config.device))
    train = resolve_callable(config.train, "train", config.base_dir)
    train(out_dir, settings)
    if not (out_dir / "metrics.jsonl").is_file():
        raise ValueError(f"[tool.autohdr] train {config.train} wrote no metrics.jsonl into its run_dir {out_dir}: "
                         f"attach autohdr's instrumentation to the loop with that run_dir")
    history = read_metrics(out_dir)
    verdicts = judge(history, preset.judge)
    diagnoses = diagnose(verdicts, history, reference_lr=preset_reference_lr(mode, preset.train.stage))
    report = {"mode": preset.mode, "runbook_name": preset.runbook_name, "stage": preset.train.stage,
              "all_good": all_good(verdicts), "train": config.train,
              "verdicts": [v.to_dict() for v in verdicts], "diagnoses": [d.to_dict() for d in diagnoses],
              "figures": {"wall_time_s": time.perf_counter() - started}, "out_dir": str(out_dir),
              "data_root": str(root), "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


def load_run(mode: str, out_dir: Path) -> JudgedRun:
    """The :class:`JudgedRun` stored in ``out_dir`` by :func:`make_run`."""
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    verdicts = [Verdict(**item) for item in report["verdicts"]]
    diagnoses = [Diagnosis.from_dict(item) for item in report.get("diagnoses", [])]
    return JudgedRun(mode, out_dir, report, verdicts, diagnoses, read_metrics(out_dir))
