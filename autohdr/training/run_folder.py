"""One run per folder: ``run.lock`` in the run folder, and no new run over a finished one.

The rule (README, "Run folders"):

* While a run is going, its folder holds ``run.lock`` (JSON: ``pid``, ``host``, ``started``,
  ``argv``), created with ``O_CREAT | O_EXCL`` so that exactly one of two runs starting together
  gets it. A second run into that folder is refused, naming the holder's pid, host and start time.
* A lock whose process no longer runs on this host (a run killed with ``kill -9``, a power cut) is
  stale: the next run takes it over and says so in one line. A lock written on another host cannot
  be checked from here and is never taken over: delete it by hand when no run uses the folder.
* A folder that already holds a run (``metrics.jsonl`` or ``report.json``) is not reused by a new
  run: continue that run with ``--resume`` (its ``last.pt`` or ``interrupted.pt``), or give a new
  ``--out``.

The lock is released (the file removed) on every exit path of the run; a folder the claim created
and that is still empty then is removed as well, so a run refused for bad input leaves nothing.
Under torchrun only rank 0 claims the folder (:func:`claim_on_main`) and every rank learns the result.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LOCK_NAME = "run.lock"
#: files whose presence means the folder already holds a run
RUN_MARKERS = ("metrics.jsonl", "report.json")
#: checkpoints a run can be continued from, most recent first
RESUMABLE = ("interrupted.pt", "last.pt")


class RunFolderError(ValueError):
    """The run folder cannot be used (in use by another run, or holding a finished one)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        try:
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        finally:
            kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    """What ``run.lock`` says about the run holding it."""

    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def _read_holder(path: Path) -> LockHolder | None:
    """The lock's holder, or ``None`` when the file is unreadable or not a lock written here."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunFolderLock:
    """A held ``run.lock``; :meth:`release` (or leaving a ``with`` block) removes it."""

    def __init__(self, folder: Path, holder: LockHolder, created_folder: bool) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.holder = holder
        self._created_folder = created_folder
        self._held = True

    def release(self) -> None:
        """Remove the lock if it is still ours; then the folder, if this claim created it and it is empty."""
        if not self._held:
            return
        self._held = False
        if _read_holder(self.path) == self.holder:
            self.path.unlink(missing_ok=True)
        if self._created_folder:
            try:
                self.folder.rmdir()  # only succeeds when nothing was written
            except OSError:
                pass

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _try_create(path: Path, holder: LockHolder) -> bool:
    """Create ``path`` holding ``holder``; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    content = {"pid": holder.pid, "host": holder.host, "started": holder.started, "argv": sys.argv}
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(content) + "\n")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _in_use(folder: Path, holder: LockHolder | None, how: str) -> RunFolderError:
    path = folder / LOCK_NAME
    if holder is None:
        return RunFolderError(f"run folder {folder} is in use: {path} exists but cannot be read (a run starting "
                              f"right now?); if no run uses this folder, delete {path}")
    return RunFolderError(f"run folder {folder} is in use by {holder.describe()} ({path}); {how}")


def acquire(folder: str | Path, log: Callable[[str], None] | None = None) -> RunFolderLock:
    """Take ``folder/run.lock`` (creating the folder), taking over a stale lock of this host.

    Raises:
        RunFolderError: another live run holds the lock, or the lock is from another host or unreadable.
    """
    folder = Path(folder)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = LockHolder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        for attempt in range(2):
            if _try_create(path, me):
                return RunFolderLock(folder, me, created)
            holder = _read_holder(path)
            if holder is None:
                raise _in_use(folder, None, "")
            if holder.host != me.host:
                raise _in_use(folder, holder, f"a lock of another host cannot be checked from here: if no run "
                                              f"uses this folder, delete {path}")
            if pid_alive(holder.pid) or attempt == 1:
                raise _in_use(folder, holder, "wait for that run to end, or give another --out (if that pid is "
                                              f"not an autohdr run, it was reused: delete {path})")
            log(f"notice: taking over the stale lock {path} of {holder.describe()}: that process no longer runs")
            path.unlink(missing_ok=True)
    except BaseException:
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def refuse_finished(folder: Path) -> None:
    """Raise :class:`RunFolderError` when ``folder`` already holds a run (a new run must not reuse it)."""
    present = [name for name in RUN_MARKERS if (folder / name).exists()]
    if not present:
        return
    checkpoint = next((folder / name for name in RESUMABLE if (folder / name).is_file()), None)
    how = (f"or continue that run with --resume {checkpoint} (autohdr train)" if checkpoint is not None
           else "(that run left no checkpoint to continue from)")
    raise RunFolderError(f"run folder {folder} already holds a run ({', '.join(present)}): a folder holds one run, "
                         f"so give a new --out, {how}")


def claim(folder: str | Path, *, resume: bool, log: Callable[[str], None] | None = None) -> RunFolderLock:
    """Lock ``folder`` for a run; a new run (``resume=False``) also needs a folder without a run in it."""
    lock = acquire(folder, log)
    if not resume:
        try:
            refuse_finished(lock.folder)
        except BaseException:
            lock.release()
            raise
    return lock


def claim_on_main(folder: str | Path, *, resume: bool, dist_ctx, log: Callable[[str], None] | None = None
                  ) -> RunFolderLock | None:
    """:func:`claim` on rank 0 only; every rank raises the same :class:`RunFolderError` when it fails.

    ``dist_ctx`` is a :class:`autohdr.training.distributed.DistContext`. Returns the lock on rank 0,
    ``None`` on the other ranks.
    """
    from autohdr.training.distributed import gather_objects
    lock, error = None, None
    if dist_ctx.is_main:
        try:
            lock = claim(folder, resume=resume, log=log)
        except RunFolderError as exc:
            error = str(exc)
        except OSError as exc:
            if not dist_ctx.enabled:
                raise
            error = f"run folder {folder}: {exc.strerror or exc}"
    if dist_ctx.enabled:
        error = gather_objects(error, dist_ctx)[0]
    if error is not None:
        raise RunFolderError(error)
    return lock


__all__ = ["LOCK_NAME", "RUN_MARKERS", "LockHolder", "RunFolderError", "RunFolderLock", "acquire", "claim",
           "claim_on_main", "pid_alive", "refuse_finished"]
