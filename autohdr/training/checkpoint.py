"""Atomic checkpoint files that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors and plain values only: ``model`` (state dict), ``optimizer``,
``scheduler``, ``epoch``, ``global_step``, ``best_score``, ``config`` (the TrainConfig as a dict),
``model_config`` (when the model has one), ``rng`` (torch CPU RNG state) and ``instrumentation``
(``Instrumentation.state_dict()``: the hooks' counters and each observer's state, which a resume
in the middle of an epoch needs to continue its figures exactly; a checkpoint without it, from an
earlier release, resumes from its top-level counters).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

#: Temporary files of :func:`save_atomic`: ``.<name>.<pid>.<random>.autohdr.tmp`` beside ``<name>``.
_TMP_SUFFIX = ".autohdr.tmp"
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX) + "$")
#: The earlier naming (``.<name>.pt.<random>.tmp``, no pid), still recognized as orphans.
_LEGACY_TMP_NAME = re.compile(r"^\.(?P<target>.+\.pt)\.[a-z0-9_]{8}\.tmp$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder...); ``filename`` is the checkpoint.

    The file at that path, if any, is the previous checkpoint, untouched, and no temporary is left.
    """


def orphaned_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files that :func:`save_atomic` left in ``folder`` when its process died (``kill -9``).

    Only names of :func:`save_atomic`'s pattern count; a temporary of a process that still runs on
    this machine (a save in flight) does not.
    """
    from autohdr.training.run_folder import pid_alive
    found = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match is not None:
            pid = int(match["pid"])
            if pid != os.getpid() and pid_alive(pid):
                continue
        elif _LEGACY_TMP_NAME.match(entry.name) is None:
            continue
        if entry.is_file() and not entry.is_symlink():
            found.append(entry)
    return sorted(found)


def remove_orphaned_temporaries(folder: str | Path) -> list[Path]:
    """Delete :func:`orphaned_temporaries` of ``folder``; returns what was removed."""
    removed = []
    for path in orphaned_temporaries(folder):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first ``OSError`` in ``exc`` or its causes (torch wraps a failed write in a ``RuntimeError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` so that a crash never leaves a partial file there.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and the file
    is then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows). Temporaries
    that an earlier, killed process left in the folder are removed first.

    Raises:
        CheckpointWriteError: the file could not be written (e.g. ``ENOSPC``, no space left on the
            device): ``path`` still holds the previous checkpoint and the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path.parent)
    tmp_name: str | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        cause = _os_error_in(exc) if isinstance(exc, Exception) else None
        if cause is None or isinstance(exc, CheckpointWriteError):
            raise
        reason = cause.strerror or os.strerror(cause.errno)
        raise CheckpointWriteError(cause.errno, f"{reason} while writing checkpoint", str(path)) from exc
    return path


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNSAFE_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _why_unreadable(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line of autohdr's own.

    torch's message advises re-running with ``weights_only=False``, which executes whatever code
    the file's pickle names: for a file of unknown origin (``--init-from`` anything) that advice
    is not passed on.
    """
    text = str(exc)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = _UNSAFE_GLOBAL.search(text)
        if found:
            what = f"a Python object of type {found[1]}"
        elif _UNSAFE_OPERAND.search(text):
            what = "pickle instructions torch.save does not write (a plain pickle file?)"
        else:
            what = "data other than tensors and plain values"
        return (f"it holds {what}, which a safe (weights-only) load refuses: autohdr never runs code "
                f"from a checkpoint file; save only the model's state_dict and plain values (torch.save)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (f"it is not a torch checkpoint file (torch.load: {type(exc).__name__}"
            + (f": {first[:160]}" if first else "") + ")")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); clear errors for missing or bad files.

    Raises:
        FileNotFoundError: no file at ``path`` (a broken symlink is named as one).
        ValueError: naming ``path`` and why it is not an autohdr checkpoint, never with torch's
            advice to load it unsafely.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_symlink():
            raise FileNotFoundError(f"checkpoint {path} is a broken symlink (to {os.readlink(path)})")
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} could not be read: {_why_unreadable(exc)}") from None
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
