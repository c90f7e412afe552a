"""Several ``autohdr debug`` runs in one torchrun launch, each as if it had a launch of its own.

Every torchrun launch pays for the launcher and for each rank importing torch and autohdr (about 4 s
of CPU before any work). :func:`launch` pays that once for a list of runs:

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.ddp_jobs JOBS.json

``JOBS.json`` is a list of ``{"name": ..., "argv": [...]}``, ``argv`` as for ``autohdr`` on CPU
(``["debug", "stage2_probe", ..., "--device", "cpu", "--out", ...]``). Every rank runs the jobs in that
order, each by calling :func:`autohdr.cli.main` in-process in a gloo process group of its own
(:func:`_process_group`), which autohdr's ``run_debug_mode`` finds joined, uses, and leaves at its end.
The group is joined here rather than by autohdr because a default group joined again through
torchrun's store reuses the previous group's keys there: a rank that arrives first reads its peer's
old address and waits for it until the timeout (seen: the second job hung whenever rank 0 was still
printing the first one's report). Each job's group keeps its keys under a prefix of its own.
Before each job the rank is put back to the state it started in (:class:`ProcessState`: random
generators, torch's thread count, grad mode and default dtype, environment, working directory,
signal handlers; :func:`run_job` restores the warning filters), so a job cannot see what an earlier
one left behind. (Caches of pure results, such as autohdr's memoized proxy baselines, are kept: they
change how long a later job takes, not what it computes.)

Per job and rank, ``<folder>/<name>/rank<R>.json`` holds ``{"returncode", "stdout", "stderr"}``: the
job's exit code (``main``'s return value; 1 with the traceback on stderr when it raised, a
``SystemExit``'s code) and what the rank wrote to file descriptors 1 and 2 during the job (Python's and
C++'s output alike). A failed job does not stop the next one. :func:`launch` merges the ranks' files
into one :class:`subprocess.CompletedProcess`-like dict per job, as a launch of that job alone
would have given.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

#: The signals whose handlers are restored between jobs (autohdr's StopRequest installs its own).
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def rank_file(folder: Path, name: str, rank: int) -> Path:
    """Where rank ``rank`` leaves job ``name``'s exit code and output."""
    return folder / name / f"rank{rank}.json"


# ------------------------------------------------------------------ the launching side

def launch(folder: Path, jobs: Mapping[str, Sequence[str]], *, env: Mapping[str, str], cwd: Path,
           nproc: int = 2, timeout_per_job: float = 300.0) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (name -> ``autohdr`` argv, in order) in one torchrun launch of ``nproc`` ranks.

    Returns, per job name, ``{"args", "returncode", "stdout", "stderr"}`` (JSON-able, the fields of a
    ``subprocess.CompletedProcess``): ``returncode`` is 0 when every rank returned 0, else the first
    non-zero rank's code (rank order); ``stdout`` / ``stderr`` are the ranks' output, rank 0 first.
    A job some rank left no file for (the launch died) gets the launch's own exit code and output.
    """
    command = [*torchrun_command(nproc), "-m", "tests.ddp_jobs", str(write_jobs(folder, jobs))]
    done = subprocess.run(command, cwd=cwd, env=dict(env), capture_output=True, text=True,
                          timeout=timeout_per_job * max(1, len(jobs)))
    return {name: job_result(folder, name, [*torchrun_command(nproc), "-m", "autohdr", *argv], nproc, done)
            for name, argv in jobs.items()}


def torchrun_command(nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N`` with this interpreter; the module and its arguments follow."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def write_jobs(folder: Path, jobs: Mapping[str, Sequence[str]]) -> Path:
    """``folder/jobs.json``: the jobs (name -> ``autohdr`` argv, in order) as the ranks read them."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs_file = folder / "jobs.json"
    jobs_file.write_text(json.dumps([{"name": name, "argv": list(argv)} for name, argv in jobs.items()]),
                         encoding="utf-8")
    return jobs_file


def job_result(folder: Path, name: str, args: list[str], nproc: int,
               launch_result: subprocess.CompletedProcess) -> dict[str, Any]:
    """Job ``name``'s result from its ranks' files, as :func:`launch` returns it (``args``: its command)."""
    files = [rank_file(folder, name, rank) for rank in range(nproc)]
    if not all(path.is_file() for path in files):
        missing = [str(path) for path in files if not path.is_file()]
        return {"args": args, "returncode": launch_result.returncode or -1, "stdout": launch_result.stdout,
                "stderr": f"{launch_result.stderr}\ntests.ddp_jobs: no result in {', '.join(missing)}\n"}
    ranks = [json.loads(path.read_text(encoding="utf-8")) for path in files]
    failed = [rank["returncode"] for rank in ranks if rank["returncode"] != 0]
    return {"args": args, "returncode": failed[0] if failed else 0,
            "stdout": "".join(rank["stdout"] for rank in ranks),
            "stderr": "".join(rank["stderr"] for rank in ranks)}


# ------------------------------------------------------------------ the rank side

@dataclass
class ProcessState:
    """What an ``autohdr`` run could change in its process and a fresh process would not have: the
    random generators (torch, NumPy, ``random``), torch's intra-op thread count, grad mode and default
    dtype, the environment, the working directory and the stop-signal handlers. (Warning filters are
    restored by :func:`run_job`'s ``warnings.catch_warnings``.)"""

    torch_rng: Any
    numpy_rng: Any
    python_rng: Any
    threads: int
    grad_enabled: bool
    default_dtype: Any
    environ: dict[str, str]
    cwd: str
    handlers: dict[int, Any]

    @classmethod
    def capture(cls) -> "ProcessState":
        import numpy as np
        import torch
        return cls(torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.get_num_threads(),
                   torch.is_grad_enabled(), torch.get_default_dtype(), dict(os.environ), os.getcwd(),
                   {sig: signal.getsignal(sig) for sig in _SIGNALS})

    def restore(self) -> None:
        import numpy as np
        import torch
        torch.set_rng_state(self.torch_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(self.grad_enabled)
        torch.set_default_dtype(self.default_dtype)
        os.environ.clear()
        os.environ.update(self.environ)
        os.chdir(self.cwd)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


@contextmanager
def _output_to(stdout_path: Path, stderr_path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (so Python's ``sys.stdout`` / ``sys.stderr`` and C++ alike) go to
    the two files inside the block, and back to where they went before after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def run_job(argv: list[str]) -> int:
    """``autohdr.cli.main(argv)``'s exit code, the warning filters restored after it: an exception is
    printed to stderr with its traceback and gives 1 (what Python exits with), a ``SystemExit`` its code."""
    from autohdr.cli import main
    try:
        # the filters and showwarning come back afterwards, and warnings shown "once" show again
        with warnings.catch_warnings():
            return main(argv)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception:  # noqa: BLE001 -- the job's failure is its result; the next job still runs
        traceback.print_exc()
        return 1


@contextmanager
def _process_group(store: Any, rank: int, world_size: int, prefix: str) -> Iterator[None]:
    """The default process group (gloo, as autohdr takes on CPU) on ``store`` under ``prefix``, for one
    job; left afterwards unless the job left it already (autohdr leaves it at the end of a run)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_jobs(jobs_file: Path) -> None:
    """This rank's side of :func:`launch`: every job in ``jobs_file``, in order (see the module docstring)."""
    import torch.distributed as dist
    jobs = json.loads(jobs_file.read_text(encoding="utf-8"))
    store, rank, world_size = next(dist.rendezvous("env://"))  # torchrun's store, as autohdr would join it
    fresh = ProcessState.capture()
    for index, job in enumerate(jobs):
        where = rank_file(jobs_file.parent, job["name"], rank)
        where.parent.mkdir(parents=True, exist_ok=True)
        stdout, stderr = where.with_suffix(".stdout"), where.with_suffix(".stderr")
        fresh.restore()
        with _output_to(stdout, stderr):
            with _process_group(store, rank, world_size, f"tests.ddp_jobs/{index}/"):
                code = run_job(job["argv"])
        result = {"returncode": code, "stdout": stdout.read_text(encoding="utf-8", errors="replace"),
                  "stderr": stderr.read_text(encoding="utf-8", errors="replace")}
        where.write_text(json.dumps(result), encoding="utf-8")


def _exit(code: int) -> None:
    """Leave as ``autohdr``'s own entry point does under torchrun: flushed, without interpreter
    teardown, which can abort on gloo's worker threads after a good run (torchrun: a failed job)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_jobs(Path(sys.argv[1]))
    _exit(0)
