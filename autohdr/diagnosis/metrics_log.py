"""The run's metric history: one JSON object per line in ``metrics.jsonl``.

Every record has a ``kind`` (``run_start``, ``init``, ``train_step``, ``warning``, ``val_epoch``,
``epoch_end``, ``error``, ``interrupted``, ``run_end``). Numbers are written as JSON numbers with full
precision (``repr``-exact), missing values as ``null``, and the non-finite floats of a diverged run
as the tokens ``NaN``, ``Infinity`` and ``-Infinity`` (Python's ``json`` writes them, and both it
and pandas read them back as float nan / inf; strict JSON parsers refuse them), never as strings. So :func:`read_metrics` gives back exactly what was logged, and so does
``pandas.read_json(path, lines=True, precise_float=True, dtype=False)``. Without those two options
pandas rounds the last digits of some floats and turns an all-digit checksum string into a number.
Files written by an older autohdr hold non-finite values as the strings ``"nan"``, ``"inf"`` and
``"-inf"``: :func:`read_metrics` restores them as floats (checksums are hex strings, which can never
read like that).

A crash in the middle of a write can leave the last line incomplete. Such a **torn** line -- the
file's final line, without its trailing newline, that does not parse as a record -- is dropped by
:func:`read_metrics` and :meth:`MetricsWriter.continue_from` with an
:class:`IncompleteLastLineWarning` naming ``file:line``; every other bad line (anywhere else, or a
final line that ends with a newline) is an error naming ``file:line``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd


class IncompleteLastLineWarning(UserWarning):
    """The last line of a ``metrics.jsonl`` was cut short (a crash mid-write) and was left out."""


def _parse(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for every non-blank line of ``text`` (the content of ``path``).

    A torn final line (no trailing newline, not a record) is left out with an
    :class:`IncompleteLastLineWarning`; any other line that is not a record raises ``ValueError``
    naming ``path:line``.
    """
    lines = text.split("\n")  # a file ending with a newline gives a last, empty element
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError(f"{path}:{number}: no autohdr records (each line is an object with a 'kind')")
        except ValueError as exc:
            if number == len(lines):  # the final line, and it has no newline: cut short by a crash
                warnings.warn(f"{path}:{number}: incomplete last line ({len(line)} characters, no newline; a crash "
                              f"while writing?) left out", IncompleteLastLineWarning, stacklevel=3)
                break
            if isinstance(exc, json.JSONDecodeError):
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg}); is this an autohdr metrics.jsonl?") from None
            raise
        out.append((line, record))
    return out


#: How an older autohdr wrote non-finite floats (``str(float)``), restored by :func:`restore_non_finite`.
LEGACY_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def restore_non_finite(value: Any) -> Any:
    """``value`` with the strings ``"nan"`` / ``"inf"`` / ``"-inf"`` (an older autohdr's way of
    writing non-finite floats) turned back into floats, inside dicts and lists too; anything else
    unchanged."""
    if isinstance(value, str):
        return LEGACY_NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: restore_non_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_non_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """``value`` with numpy / torch scalars turned into Python numbers, so JSON writes numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)  # numpy and 0-d torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return item()
    return value


class MetricsWriter:
    """Writes records to ``metrics.jsonl``; a disabled writer (non-zero DDP rank) writes nothing.

    :meth:`start_fresh` begins a new history (an older file is kept as ``metrics.jsonl.prev``);
    :meth:`continue_from` keeps the history up to a resumed step and appends after it, so a resumed
    run's file reads like the uninterrupted run's.
    """

    #: record kinds that close a run; dropped when the run is continued
    ENDING_KINDS = ("run_end", "interrupted", "error")

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._handle = None

    def start_fresh(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.replace(self.path.with_name(self.path.name + ".prev"))
        self._handle = open(self.path, "w", encoding="utf-8")

    def continue_from(self, step: int) -> None:
        """Keep records with ``step <= step`` (and step-less ones) that do not close a run.

        The kept history is written to a temporary file that then replaces ``metrics.jsonl``
        (a crash meanwhile leaves the old file whole), and new records are appended after it. A
        torn last line is dropped (:class:`IncompleteLastLineWarning`); any other bad line is a
        ``ValueError`` naming ``file:line``.
        """
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            for line, record in _parse(self.path, self.path.read_text(encoding="utf-8")):
                if record.get("kind") in self.ENDING_KINDS:
                    continue
                if record.get("step") is None or record["step"] <= step:
                    kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in kept))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        try:
            # allow_nan: non-finite floats as NaN / Infinity / -Infinity, which json.loads and pandas read back
            self._handle.write(json.dumps(_plain(record), allow_nan=True) + "\n")
            self._handle.flush()
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:  # name the file (e.g. a full disk)
                raise OSError(exc.errno, f"{exc.strerror} while writing metrics", str(self.path)) from exc
            raise

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path_or_dir: str | Path) -> pd.DataFrame:
    """Read ``metrics.jsonl`` (or the one inside a run folder) into a DataFrame.

    A torn last line (see the module's docstring) is left out with an
    :class:`IncompleteLastLineWarning`; any other line that is not a record is a ``ValueError``
    naming ``file:line``. Non-finite values come back as float nan / inf, also from files an
    older autohdr wrote with them as strings.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records = [restore_non_finite(record) for _, record in _parse(path, path.read_text(encoding="utf-8"))]
    if not records:
        raise ValueError(f"metrics file {path} is empty")
    return pd.DataFrame.from_records(records)
