"""Adds the generated tests (:mod:`autohdr.testing.signal_tests`) to a configured session.

They are collected from the installed module under the node id ``autohdr`` (so
``autohdr::test_signal[stage2_probe-residual_contributes]``), before ``-m`` / ``-k`` deselect:
``pytest -m stage2_probe`` keeps exactly that mode's signal tests (and the user's own tests with
the marker).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autohdr.testing import signal_tests

NODE_ID = "autohdr"


class GeneratedModule(pytest.Module):
    """:mod:`autohdr.testing.signal_tests`, already imported (not re-imported from its file path)."""

    def _getobj(self):
        return signal_tests


def _wanted(item: pytest.Item, has_benchmark: bool) -> bool:
    name = getattr(item, "originalname", item.name)
    if name == "test_gpu_throughput":
        return has_benchmark
    if name == "test_gpu_throughput_needs_pytest_benchmark":
        return not has_benchmark
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    module = GeneratedModule.from_parent(session, path=Path(signal_tests.__file__), nodeid=NODE_ID)
    has_benchmark = config.pluginmanager.hasplugin("benchmark")
    generated = [item for item in module.collect() if isinstance(item, pytest.Item) and _wanted(item, has_benchmark)]
    # reported like any collected module, so "collected N items" and the deselected count include them
    session.ihook.pytest_collectreport(report=pytest.CollectReport(NODE_ID, "passed", None, generated))
    items.extend(generated)
