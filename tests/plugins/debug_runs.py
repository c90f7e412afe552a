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
from filelock import FileLock

from autohdr.diagnosis.debug import build_loaders, data_preset_from_env, run_debug_mode, select_rows
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.diagnosis.presets import load_preset
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
    loader, and for the validation loader too where the wrapper says ``applies_to_val``.
    """

    name: str
    mode: str
    model: str | None = None
    loader_sleep_factor: float = 0.0
    loader_fault: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    epochs: int | None = None
    seed: int = 0

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
                          epochs=spec.epochs, plots=False, log=lambda message: None)


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores: N workers each running torch
    with all cores oversubscribe the CPU and make every run several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[RunSpec], DebugRun]:
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

    return get


def _run_names_of(item: pytest.Item, known: set[str]) -> set[str]:
    """Names of the shared runs a parametrized test item judges: RunSpec parameters, parameters that
    carry one as ``.spec`` (faults), and string parameters naming a known run."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    names = set()
    for value in params.values():
        spec = value if isinstance(value, RunSpec) else getattr(value, "spec", None)
        if isinstance(spec, RunSpec):
            names.add(spec.name)
        elif isinstance(value, str) and value in known:
            names.add(value)
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``, every test of one shared run goes to the same worker: otherwise two
    workers ask for the same run at once and one of them waits on its lock, idle, while the other
    trains it (measured: a fifth of the gate's wall time on 2 cores)."""
    known: set[str] = set()
    for item in items:
        known |= _run_names_of(item, set())
    for item in items:
        names = _run_names_of(item, known)
        if len(names) == 1 and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(name=names.pop()))
