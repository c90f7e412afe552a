"""Adds the generated tests (:mod:`autohdr.testing.signal_tests`) to a configured session.

They are collected from the installed module under the node id ``autohdr`` (so
``autohdr::test_signal[stage2_probe-residual_contributes]``), before ``-m`` / ``-k`` deselect:
``pytest -m stage2_probe`` keeps exactly that mode's signal tests (and the user's own tests with
the marker).

They are added when the session runs the whole repository: no path arguments (``testpaths`` or the
current folder) or the repository root itself. ``pytest tests/test_x.py`` runs that file only, and
trains nothing. Under pytest-xdist the controller decides and tells its workers (their own
arguments are the controller's resolved paths).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autohdr.testing import signal_tests

NODE_ID = "autohdr"
#: ``workerinput`` key carrying the controller's decision to pytest-xdist workers.
WORKER_KEY = "autohdr_add_generated_tests"


def runs_whole_repository(config: pytest.Config) -> bool:
    """No path arguments, or one that is the rootdir: the session is the repository's whole suite."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and WORKER_KEY in workerinput:
        return bool(workerinput[WORKER_KEY])
    if config.args_source is not pytest.Config.ArgsSource.ARGS:
        return True
    invoked = Path(config.invocation_params.dir)
    return any((invoked / arg.split("::", 1)[0]).resolve() == config.rootpath.resolve() for arg in config.args)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist (controller): hand the decision to each worker."""
    node.workerinput[WORKER_KEY] = runs_whole_repository(node.config)


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
    if not runs_whole_repository(config):
        return
    module = GeneratedModule.from_parent(session, path=Path(signal_tests.__file__), nodeid=NODE_ID)
    has_benchmark = config.pluginmanager.hasplugin("benchmark")
    generated = [item for item in module.collect() if isinstance(item, pytest.Item) and _wanted(item, has_benchmark)]
    # reported like any collected module, so "collected N items" and the deselected count include them
    session.ihook.pytest_collectreport(report=pytest.CollectReport(NODE_ID, "passed", None, generated))
    for item in generated:
        if getattr(item, "originalname", item.name).startswith("test_gpu_throughput"):
            item.add_marker("gpu")
            item.add_marker("autohdr")
    items.extend(generated)
