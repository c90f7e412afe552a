"""Root pytest configuration: shared plugins live in tests/plugins/, one job each."""

from __future__ import annotations

pytest_plugins = [
    "tests.plugins.data_fixtures",
    "tests.plugins.debug_runs",
    "tests.plugins.gpu",
    "tests.plugins.threads",
]

#: Packages whose own asserts pytest need not rewrite here: pytest marks every module of every
#: installed pytest plugin's distribution for assertion rewriting, so each process of this suite
#: parsed and rewrote ~90 modules of hypothesis, pytest-benchmark and xdist (with
#: PYTHONDONTWRITEBYTECODE set, as on these machines, nothing rewritten is cached): ~40 % of a
#: worker's collection. Their asserts are not this suite's assertions; tests/ keeps its rewriting.
THIRD_PARTY_LEFT_AS_WRITTEN = ("hypothesis", "_hypothesis_pytestplugin", "_hypothesis_globals",
                               "pytest_benchmark", "xdist")


def pytest_configure(config) -> None:
    hook = getattr(config.pluginmanager, "rewrite_hook", None)
    marked = getattr(hook, "_must_rewrite", None)  # pytest's own set (9.x); absent: nothing to change
    if isinstance(marked, set):
        marked.difference_update(THIRD_PARTY_LEFT_AS_WRITTEN)
        getattr(hook, "_marked_for_rewrite_cache", {}).clear()
