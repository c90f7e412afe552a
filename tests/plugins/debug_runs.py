"""One trained debug run per configuration, shared by every test that judges it.

``debug_run(spec)`` (session fixture) returns the :class:`DebugRun` of a :class:`RunSpec`: the
first test that asks trains it, every later test (in any pytest-xdist worker) reads the stored
report. Workers share one folder under the session's base temp directory and take a file lock
per run, so each configuration trains exactly once per session, whatever ``-n`` is.

A run also checks that it left the data root byte-identical (the dataset is never written to).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
import torch
from filelock import FileLock

from autohdr.runs.debug import build_loaders, data_preset_from_env, run_debug_mode, select_rows
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.runs.presets import load_preset
from autohdr.data.settings import default_fixture_root
from autohdr.diagnosis.verdicts import Verdict
from tests import faults
from tests.plugins.data_fixtures import hash_tree


@dataclass(frozen=True)
class RunSpec:
    """A debug run: a mode, optionally broken by a fault, with preset overrides.

    ``model`` names a model class in :mod:`tests.faults` (``None``: the healthy model);
    ``loader_sleep_factor > 0`` wraps the training loader in :class:`tests.faults.SleepingLoader`, which
    holds each batch back that many times the previous step's own compute (independent of machine load);
    ``loader_fault`` names a loader wrapper in :mod:`tests.faults` (a data bug) for the training
    loader, and for the validation loader too where the wrapper says ``applies_to_val``;
    ``fail_fast`` as in :func:`~autohdr.runs.debug.run_debug_mode` (on by default, as for users).
    """

    name: str
    mode: str
    model: str | None = None
    loader_sleep_factor: float = 0.0
    loader_fault: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    epochs: int | None = None
    seed: int = 0
    fail_fast: bool = True

    def describe(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "overrides" else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class DebugRun:
    """A finished run: its report, its metric history and its folder."""

    spec: RunSpec
    report: dict[str, Any]
    out_dir: Path
    history: pd.DataFrame = field(repr=False)

    def verdict(self, signal: str) -> Verdict:
        for item in self.report["verdicts"]:
            if item["signal"] == signal:
                return Verdict(**item)
        raise KeyError(f"run {self.spec.name} has no verdict for {signal!r}")


def _train(spec: RunSpec, out_dir: Path) -> dict[str, Any]:
    overrides = dict(spec.overrides)
    # A fault model's initial weights from the run's seed, not from whatever this worker ran before
    # (run_debug_mode seeds only the models it builds itself): the same run in any worker, any order.
    torch.manual_seed(spec.seed)
    model = getattr(faults, spec.model)() if spec.model else None
    train_loader = val_loader = None
    if spec.loader_sleep_factor > 0 or spec.loader_fault:
        preset = load_preset(spec.mode, overrides)
        data = data_preset_from_env(preset.data)
        train_rows, val_rows = select_rows(default_fixture_root(), data)
        train_loader, val_loader = build_loaders(train_rows, val_rows, data, spec.seed)
        if spec.loader_sleep_factor > 0:
            train_loader = faults.SleepingLoader(train_loader, spec.loader_sleep_factor)
        if spec.loader_fault:
            wrapper = getattr(faults, spec.loader_fault)
            train_loader = wrapper(train_loader)
            val_loader = wrapper(val_loader) if wrapper.applies_to_val else val_loader
    return run_debug_mode(spec.mode, model=model, train_loader=train_loader, val_loader=val_loader,
                          out_dir=out_dir, device="cpu", seed=spec.seed, overrides=overrides,
                          epochs=spec.epochs, plots=False, log=lambda message: None, fail_fast=spec.fail_fast)


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores: N workers each running torch
    with all cores oversubscribe the CPU and make every run several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _specs_of(item: pytest.Item) -> list[RunSpec]:
    """The shared runs a test item names in its parameters (a RunSpec, or an object with ``.spec``)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    specs = [value if isinstance(value, RunSpec) else getattr(value, "spec", None) for value in params.values()]
    return [spec for spec in specs if isinstance(spec, RunSpec)]


def _cost(spec: RunSpec) -> float:
    """Relative CPU cost of a run: pixels trained and validated (a validation costs about 2 epochs)."""
    preset = load_preset(spec.mode, dict(spec.overrides))
    train = dataclasses.replace(preset.train, epochs=spec.epochs or preset.train.epochs)
    validations = -(-train.epochs // train.validation_interval)
    height, width = preset.data.resize_hw
    return preset.data.num_pairs * height * width * (train.epochs + 2 * validations)


def _this_workers_share(items: list[pytest.Item]) -> list[RunSpec]:
    """Under pytest-xdist: the runs this worker trains up front. Every run the selected tests name is
    given to the worker with the least work so far, costliest first, so the workers train in
    parallel instead of one waiting on another's lock for a run both need."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2:
        return []
    unique = {spec.name: spec for item in items for spec in _specs_of(item)}
    load, mine = [0.0] * count, []
    for spec in sorted(unique.values(), key=lambda s: (-_cost(s), s.name)):
        target = load.index(min(load))
        load[target] += _cost(spec)
        if target == int(worker[2:]):
            mine.append(spec)
    return mine


@pytest.fixture(scope="session")
def debug_run(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[RunSpec], DebugRun]:
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "debug-runs"
    shared.mkdir(parents=True, exist_ok=True)
    data_root = default_fixture_root()
    _share_cores_between_workers()
    loaded: dict[str, DebugRun] = {}

    def get(spec: RunSpec) -> DebugRun:
        if spec.name in loaded:
            return loaded[spec.name]
        out_dir = shared / spec.name
        with FileLock(str(shared / f"{spec.name}.lock")):
            done = out_dir / "spec.json"
            if done.is_file():
                if json.loads(done.read_text()) != spec.describe():
                    raise RuntimeError(f"two different RunSpecs are both named {spec.name!r}")
                report = json.loads((out_dir / "report.json").read_text())
            else:
                before = hash_tree(data_root)
                report = _train(spec, out_dir)
                if hash_tree(data_root) != before:
                    pytest.fail(f"run {spec.name} changed files under the data root {data_root}", pytrace=False)
                done.write_text(json.dumps(spec.describe()))
        loaded[spec.name] = DebugRun(spec, report, out_dir, read_metrics(out_dir))
        return loaded[spec.name]

    for spec in _this_workers_share(request.session.items):
        get(spec)
    return get


def once_per_session(tmp_path_factory: pytest.TempPathFactory, kind: str, name: str,
                     make: Callable[[Path], dict]) -> tuple[dict, Path]:
    """``make(folder)`` once per session across pytest-xdist workers (a module-scoped fixture would
    run once per worker that happens to get one of its tests). Its JSON-able result is stored in
    ``folder``; returns ``(result, folder)``."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / kind
    shared.mkdir(parents=True, exist_ok=True)
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        stored = folder / "result.json"
        if not stored.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(make(folder)), encoding="utf-8")
        return json.loads(stored.read_text(encoding="utf-8")), folder
