"""The ``gpu`` marker: a test that needs CUDA is skipped, with the reason, where there is none.

* ``@pytest.mark.gpu`` marks a test (or benchmark) that needs a CUDA device.
* Where ``torch.cuda.is_available()`` is False, every selected ``gpu`` test is reported as
  skipped with :data:`NO_CUDA_REASON` (``-ra`` prints it): it never fails for want of a GPU and
  never passes without having run. Where CUDA is available the marker changes nothing.
* ``pytest -m gpu --benchmark-only`` on a GPU machine runs exactly the GPU benchmarks.

CUDA is asked about once, at collection, and only when a ``gpu`` test was collected. The marker is
registered here too (unless the ini file already does), so the plugin works under
``--strict-markers`` in any project that loads it.
"""

from __future__ import annotations

import pytest

MARKER = "gpu"
MARKER_HELP = "gpu: needs CUDA; skipped with the reason where there is none"
NO_CUDA_REASON = "needs CUDA: torch.cuda.is_available() is False on this machine"


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, looked up at call time (so tests can patch it)."""
    import torch

    return bool(torch.cuda.is_available())


def pytest_configure(config: pytest.Config) -> None:
    registered = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    if MARKER not in registered:
        config.addinivalue_line("markers", MARKER_HELP)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker(MARKER) is not None]
    if not gpu_items or cuda_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in gpu_items:
        item.add_marker(skip)
