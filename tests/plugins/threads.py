"""One CPU share per xdist worker: torch's intra-op threads are capped so that workers × threads is
at most the machine's cores.

Without the cap, each of ``-n auto``'s workers starts torch with one thread per core, so two workers
on two cores run four busy threads and OpenMP's spinning threads wait on each other: a module that
trained in 20 s alone took 180 s beside another worker. Subprocesses a test starts (the CLI,
torchrun) get the same cap through ``OMP_NUM_THREADS`` unless the environment already sets it.
A run outside xdist keeps torch's default.
"""

from __future__ import annotations

import os

import pytest


def threads_per_worker(cores: int, workers: int) -> int:
    """The intra-op threads each of ``workers`` processes gets on ``cores`` cores (at least 1)."""
    return max(1, cores // max(1, workers))


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads_per_worker(cores, int(workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny runs (restored after): thread start-up costs more than
    it saves at these sizes. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
