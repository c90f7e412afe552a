"""Root pytest configuration: shared plugins live in tests/plugins/, one job each."""

pytest_plugins = [
    "tests.plugins.data_fixtures",
    "tests.plugins.debug_runs",
    "tests.plugins.gpu",
    "tests.plugins.threads",
]
