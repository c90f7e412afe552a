"""One run per key and session, shared by every pytest-xdist worker through a file lock.

The first worker that asks for a key makes it (``make(folder)``) while holding ``<key>.lock``; every
later ask, in any worker, reads the stored result. Workers of one session share the parent of
their base temp folders, so a run happens once per session whatever ``-n`` is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

MISSING_FILELOCK = ("autohdr's pytest plugin needs the 'filelock' package to share its runs across "
                    "pytest-xdist workers: pip install 'autohdr[test]' (or pip install filelock)")


def _file_lock(path: Path):
    try:
        from filelock import FileLock
    except ImportError:
        raise pytest.UsageError(MISSING_FILELOCK) from None
    return FileLock(str(path))


def session_folder(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    """``kind`` under the folder every xdist worker of this session shares (the base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / kind
    shared.mkdir(parents=True, exist_ok=True)
    return shared


class RunFailed(RuntimeError):
    """The shared run of a key failed earlier in this session (its message is the first failure's)."""


def once(shared: Path, name: str, describe: dict[str, Any], make: Callable[[Path], None]) -> Path:
    """``shared/name`` after ``make(shared/name)`` ran there exactly once this session.

    ``describe`` (JSON-able) is stored beside the result: a second, different ``describe`` under the
    same name is an error, not a silent reuse. A ``make`` that raised is not retried: later asks, in
    any worker, raise :class:`RunFailed` with the first failure's message at once.
    """
    folder = shared / name
    done, failed = shared / f"{name}.done.json", shared / f"{name}.error.txt"
    with _file_lock(shared / f"{name}.lock"):
        if failed.is_file():
            raise RunFailed(failed.read_text(encoding="utf-8"))
        if done.is_file():
            if json.loads(done.read_text(encoding="utf-8")) != describe:
                raise RuntimeError(f"two different runs are both named {name!r}")
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        try:
            make(folder)
        except BaseException as exc:
            if isinstance(exc, Exception):
                failed.write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
            raise
        done.write_text(json.dumps(describe), encoding="utf-8")
    return folder
