"""Atomic checkpoint files that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors and plain values only: ``model`` (state dict), ``optimizer``,
``scheduler``, ``epoch``, ``global_step``, ``best_score``, ``config`` (the TrainConfig as a dict),
``model_config`` (when the model has one) and ``rng`` (torch CPU RNG state).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` so that a crash never leaves a partial file there.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and the file
    is then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); clear errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"checkpoint {path} is not an autohdr checkpoint (no 'model' entry)")
    return payload


def load_model_weights(model: torch.nn.Module, payload: dict[str, Any], source: str | Path) -> None:
    """``model.load_state_dict(payload["model"])``, with a mismatch reported as a ``ValueError``
    naming ``source`` and the first offending entries instead of a long ``RuntimeError``."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ValueError(f"checkpoint {source} does not fit this model (another architecture or "
                         f"--set model.*?): {detail}") from None
