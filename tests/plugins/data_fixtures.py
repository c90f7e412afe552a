"""Data fixtures: the data root, tiny overfit splits built from it, and a tree hash for immutability.

* ``--data-root DIR`` (default: ``$AUTOHDR_DATA_ROOT``, else the embedded ``fixtures/pairs``).
* ``data_root`` (session): that folder as a ``Path``.
* ``fixture_root`` (session): always the embedded fixtures (tests that need their ground truth).
* ``make_overfit_split(num_pairs, resize_hw=(128, 128))`` (session factory): an :class:`OverfitSplit`
  with ``train_csv == val_csv`` content, built once per ``(num_pairs, resize_hw)``.
* ``immutable_data_root``: ``data_root``, with a check at teardown that nothing under it changed.
* :func:`hash_tree`: a digest of a folder's file names and bytes.

Every test that uses ``data_root``, ``immutable_data_root`` or ``make_overfit_split`` is marked
``data_root`` at collection: ``pytest --data-root=DIR -m data_root`` runs exactly the tests that read
your data (the data tests, the overfit split and its script, and the overfit mode on your data).
None of them depends on the fixtures' ids, sizes or count.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from autohdr import data as data_mod
from autohdr.data.settings import default_fixture_root


#: The user's ``AUTOHDR_DATA_ROOT`` at start-up (the variables themselves are cleared, see below).
_USER_DATA_ROOT = pytest.StashKey[str]()
_CARRIED_DATA_ROOT = "PYTEST_AUTOHDR_USER_DATA_ROOT"


def pytest_configure(config: pytest.Config) -> None:
    """Clear every ``AUTOHDR_*`` variable for the session: the suite's debug runs and CLI tests are
    calibrated on the embedded fixtures, and a variable exported for real work (a data root, a
    batch size) must not change what they prove. ``AUTOHDR_DATA_ROOT`` keeps its documented
    meaning for the data fixtures below, like ``--data-root``. Tests of the variables set their
    own with ``monkeypatch``."""
    # pytest-xdist workers start after the controller cleared the variables: it hands the value on.
    user_root = os.environ.get("AUTOHDR_DATA_ROOT", "").strip() or os.environ.get(_CARRIED_DATA_ROOT, "")
    os.environ[_CARRIED_DATA_ROOT] = config.stash[_USER_DATA_ROOT] = user_root
    for name in [n for n in os.environ if n.startswith("AUTOHDR_")]:
        del os.environ[name]
    config.addinivalue_line("markers", f"{DATA_ROOT_MARK}: reads --data-root / AUTOHDR_DATA_ROOT (your data, "
                                       "or the embedded fixtures); marked at collection")


#: The marker of the tests that read the data root (see the module's docstring).
DATA_ROOT_MARK = "data_root"
_DATA_ROOT_FIXTURES = ("data_root", "immutable_data_root", "make_overfit_split")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in _DATA_ROOT_FIXTURES):
            item.add_marker(DATA_ROOT_MARK)


def user_data_root(config: pytest.Config) -> Path | None:
    """The data root the user gave (``--data-root`` or ``AUTOHDR_DATA_ROOT``), ``None`` for the fixtures."""
    chosen = config.getoption("--data-root") or config.stash.get(_USER_DATA_ROOT, "")
    if not chosen:
        return None
    root = Path(chosen).expanduser().absolute()
    return None if root.resolve() == default_fixture_root().resolve() else root


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--data-root", action="store", default=None,
                     help="folder of <id>_original / <id>_generated pairs for the data tests "
                          "(default: $AUTOHDR_DATA_ROOT, else the embedded fixtures/pairs)")


def hash_tree(path: str | Path) -> str:
    """SHA-256 over the relative path and bytes of every file under ``path`` (sorted)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class OverfitSplit:
    """A tiny overfit split: ``train_csv`` and ``val_csv`` hold the same ``rows``."""

    train_csv: Path
    val_csv: Path
    rows: pd.DataFrame
    data_root: Path
    resize_hw: tuple[int, int] | None


@pytest.fixture(scope="session")
def data_root(pytestconfig: pytest.Config) -> Path:
    chosen = pytestconfig.getoption("--data-root") or pytestconfig.stash.get(_USER_DATA_ROOT, "")
    root = Path(chosen).expanduser() if chosen else default_fixture_root()
    if not root.is_dir():
        pytest.fail(f"--data-root / AUTOHDR_DATA_ROOT {root} is not a folder", pytrace=False)
    return root.absolute()


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    return default_fixture_root()


@pytest.fixture(scope="session")
def make_overfit_split(data_root: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> Callable[..., OverfitSplit]:
    # Built per xdist worker, not shared through a FileLock: a split is two small CSVs plus a header
    # check of N pairs (milliseconds), each worker has its own basetemp, and nothing is shared, so
    # there is no cross-process race to guard and no stale copy to invalidate.
    cache: dict[tuple[int, tuple[int, int] | None], OverfitSplit] = {}

    def make(num_pairs: int, resize_hw: tuple[int, int] | None = (128, 128)) -> OverfitSplit:
        key = (int(num_pairs), tuple(resize_hw) if resize_hw is not None else None)
        if key not in cache:
            hw = "full" if key[1] is None else f"{key[1][0]}x{key[1][1]}"
            out = tmp_path_factory.mktemp(f"overfit_{key[0]}_{hw}")
            report = data_mod.prepare_overfit_split(data_root, out, key[0], seed=123, shuffle=False)
            rows = data_mod.read_split_csv(report["train_split"])
            cache[key] = OverfitSplit(Path(report["train_split"]), Path(report["val_split"]), rows,
                                      data_root, key[1])
        return cache[key]

    return make


@pytest.fixture
def immutable_data_root(data_root: Path):
    """``data_root``; the test fails at teardown if any file under it was added, removed or changed."""
    before = hash_tree(data_root)
    yield data_root
    assert hash_tree(data_root) == before, f"files under the data root {data_root} changed during the test"
