"""Fixtures for the user's own tests (registered only when ``[tool.autohdr]`` configures the plugin).

* ``autohdr_config`` (session): the :class:`~autohdr.testing.config.PluginConfig` in use.
* ``autohdr_run`` (session): ``autohdr_run(mode) -> JudgedRun``: the mode's judged run (``report``,
  ``verdicts``, ``diagnoses``, ``history`` = the metrics, ``out_dir``); trained once per session and
  shared by every test and every pytest-xdist worker.
* ``autohdr_data_root`` (session): the configured data root (default: the embedded fixtures).
* ``autohdr_fixture_root`` (session): autohdr's embedded fixture pairs (with ground truth).
* ``autohdr_overfit_split`` (session): ``autohdr_overfit_split(n) -> OverfitSplit`` with ``train_csv``
  and ``val_csv`` holding the same first ``n`` pairs of the data root, in a temp folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from autohdr.testing.config import PluginConfig
from autohdr.testing.runs import JudgedRun, data_root_of, load_run, make_run
from autohdr.testing.shared_runs import once, session_folder


@dataclass(frozen=True)
class OverfitSplit:
    """A tiny overfit split: ``train_csv`` and ``val_csv`` hold the same ``rows``."""

    train_csv: Path
    val_csv: Path
    rows: pd.DataFrame
    data_root: Path


def run_name(config: PluginConfig, mode: str) -> str:
    digest = hashlib.sha256(json.dumps(config.describe(mode), sort_keys=True).encode()).hexdigest()
    return f"{mode}-{digest[:10]}"


@pytest.fixture(scope="session")
def autohdr_config(pytestconfig: pytest.Config) -> PluginConfig:
    from autohdr.testing.plugin import CONFIG_KEY

    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def autohdr_run(autohdr_config: PluginConfig,
                tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], JudgedRun]:
    shared = session_folder(tmp_path_factory, "autohdr-runs")
    loaded: dict[str, JudgedRun] = {}

    def get(mode: str) -> JudgedRun:
        if mode not in loaded:
            describe = autohdr_config.describe(mode)
            folder = once(shared, run_name(autohdr_config, mode), describe,
                          lambda out: make_run(autohdr_config, mode, out))
            loaded[mode] = load_run(mode, folder)
        return loaded[mode]

    return get


@pytest.fixture(scope="session")
def autohdr_data_root(autohdr_config: PluginConfig) -> Path:
    try:
        return data_root_of(autohdr_config)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def autohdr_fixture_root() -> Path:
    from autohdr.data.settings import default_fixture_root

    try:
        return default_fixture_root()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def autohdr_overfit_split(autohdr_data_root: Path,
                          tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], OverfitSplit]:
    from autohdr import data as data_mod

    cache: dict[int, OverfitSplit] = {}

    def make(num_pairs: int) -> OverfitSplit:
        if num_pairs not in cache:
            out = tmp_path_factory.mktemp(f"autohdr_overfit_{num_pairs}")
            report = data_mod.prepare_overfit_split(autohdr_data_root, out, num_pairs, seed=123, shuffle=False)
            cache[num_pairs] = OverfitSplit(Path(report["train_split"]), Path(report["val_split"]),
                                            data_mod.read_split_csv(report["train_split"]), autohdr_data_root)
        return cache[num_pairs]

    return make
