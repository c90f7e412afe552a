"""autohdr's pytest plugin (the ``pytest11`` entry point ``autohdr``): the runbook's signals as tests
of the user's own model, loop and data.

Off unless configured: in a repository whose ``pyproject.toml`` (at pytest's rootdir) has no
``[tool.autohdr]`` table, and with no ``--autohdr-*`` option given, it registers its options and
nothing else: no tests, fixtures, markers or changed behaviour. Configured, it registers the
markers ``stage2_probe``, ``overfit_stage1``, ``stage3_probe``, ``gpu`` and ``autohdr``, the fixtures
of :mod:`autohdr.testing.fixtures`, and adds the tests of :mod:`autohdr.testing.signal_tests`
(``autohdr::test_signal[MODE-SIGNAL]`` for each configured mode and signal, and
``autohdr::test_gpu_throughput``). See :mod:`autohdr.testing.config` for the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autohdr.testing.config import ConfigError, PluginConfig, check, from_table, read_table, with_options

#: The configuration of an active plugin (absent when the plugin is off).
CONFIG_KEY = pytest.StashKey[PluginConfig]()
#: Markers the generated tests carry, with their help lines.
MARKERS: dict[str, str] = {
    "overfit_stage1": "autohdr: signals of the overfit_stage1 debug mode on your model",
    "stage2_probe": "autohdr: signals of the stage2_probe debug mode on your model",
    "stage3_probe": "autohdr: signals of the stage3_probe debug mode on your model",
    "gpu": "needs CUDA; skipped with the reason where there is none",
    "autohdr": "tests added by autohdr's pytest plugin ([tool.autohdr] in pyproject.toml)",
}
#: ``--autohdr-NAME`` options and the attribute each is stored under.
OPTIONS = ("model_factory", "modes", "data_root", "groups", "train", "device")
ACTIVE_PLUGIN_NAME = "autohdr-active"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autohdr", "autohdr: the runbook's signals as tests (needs [tool.autohdr])")
    group.addoption("--autohdr-model-factory", dest="autohdr_model_factory", default=None, metavar="MODULE:FUNCTION",
                    help="your model factory (overrides [tool.autohdr] model_factory)")
    group.addoption("--autohdr-modes", dest="autohdr_modes", default=None, metavar="MODE,...",
                    help="debug modes whose signals become tests (overrides modes)")
    group.addoption("--autohdr-data-root", dest="autohdr_data_root", default=None, metavar="DIR",
                    help="folder of <id>_original / <id>_generated pairs (overrides data_root)")
    group.addoption("--autohdr-groups", dest="autohdr_groups", default=None, metavar="GROUP=PREFIX,...",
                    help="parameter groups, e.g. backbone=net.encoder,param_head=net.head (overrides groups)")
    group.addoption("--autohdr-train", dest="autohdr_train", default=None, metavar="MODULE:FUNCTION",
                    help="your loop, train(run_dir, settings) -> None (overrides train)")
    group.addoption("--autohdr-device", dest="autohdr_device", default=None, metavar="DEVICE",
                    help="auto | cpu | cuda[:N] for the runs (overrides device)")
    group.addoption("--autohdr-set", dest="autohdr_set", action="append", default=None, metavar="KEY=VALUE",
                    help="a preset override for every mode, as `autohdr debug --set` (repeatable)")


def _options(config: pytest.Config) -> dict:
    given = {name: config.getoption(f"autohdr_{name}") for name in OPTIONS}
    given["set"] = config.getoption("autohdr_set")
    return given


def load_config(rootpath: Path, options: dict, cwd: Path) -> PluginConfig | None:
    """The plugin's configuration, or ``None`` when it is off (no table and no option given)."""
    pyproject = rootpath / "pyproject.toml"
    table = read_table(pyproject)
    if table is None and not any(options.values()):
        return None
    source = f"{pyproject} [tool.autohdr]" if table is not None else "--autohdr-* options"
    config = from_table(table or {}, source=source, base_dir=rootpath)
    config = with_options(config, options, cwd=cwd)
    check(config)
    return config


def pytest_configure(config: pytest.Config) -> None:
    try:
        plugin_config = load_config(config.rootpath, _options(config), Path(config.invocation_params.dir))
    except ConfigError as exc:
        raise pytest.UsageError(f"autohdr: {exc}") from None
    if plugin_config is None:
        return
    config.stash[CONFIG_KEY] = plugin_config
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
    from autohdr.testing import collection, fixtures

    config.pluginmanager.register(fixtures, "autohdr-fixtures")
    config.pluginmanager.register(collection, ACTIVE_PLUGIN_NAME)
