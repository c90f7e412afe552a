"""The run's metric history: one JSON object per line in ``metrics.jsonl``.

Every record has a ``kind`` (``run_start``, ``init``, ``train_step``, ``warning``, ``val_epoch``,
``epoch_end``, ``error``, ``run_end``). Floats are written with full precision
(``repr``-exact), so :func:`read_metrics` gives back exactly what was logged, and so does
``pandas.read_json(path, lines=True, precise_float=True, dtype=False)``. Without those two options
pandas rounds the last digits of some floats and turns an all-digit checksum string into a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
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
        """Keep records with ``step <= step`` (and step-less ones) that do not close a run."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if record.get("kind") in self.ENDING_KINDS:
                    continue
                if record.get("step") is None or record["step"] <= step:
                    kept.append(line)
        self._handle = open(self.path, "w", encoding="utf-8")
        self._handle.write("".join(line + "\n" for line in kept))
        self._handle.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path_or_dir: str | Path) -> pd.DataFrame:
    """Read ``metrics.jsonl`` (or the one inside a run folder) into a DataFrame."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg}); is this an autohdr metrics.jsonl?") from None
        if not isinstance(record, dict) or "kind" not in record:
            raise ValueError(f"{path}:{number}: no autohdr records (each line is an object with a 'kind')")
        records.append(record)
    if not records:
        raise ValueError(f"metrics file {path} is empty")
    return pd.DataFrame.from_records(records)
