"""The run's metric history: one JSON object per line in ``metrics.jsonl``.

Every record has a ``kind`` (``run_start``, ``init``, ``train_step``, ``warning``, ``val_epoch``,
``epoch_end``, ``error``, ``run_end``). Floats are written with full precision
(``repr``-exact), so ``pandas.read_json(path, lines=True)`` gives back exactly what was logged.
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
    """Appends records to ``metrics.jsonl``; a disabled writer (non-zero DDP rank) writes nothing."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._handle = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")

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
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"metrics file {path} is empty")
    return pd.DataFrame.from_records(records)
