"""The ``[tool.autohdr]`` table of a user's ``pyproject.toml``, checked, with command-line overrides.

::

    [tool.autohdr]
    model_factory = "mylens.model:build"          # MODULE:FUNCTION returning an nn.Module (required)
    modes = ["stage2_probe", "stage3_probe"]      # debug modes whose signals become tests (default: all three)
    data_root = "data/pairs"                      # relative to the pyproject.toml (default: autohdr's fixtures)
    groups = { backbone = "features", param_head = "lens", residual_head = "refine" }
    train = "mylens.loop:train"                   # optional: the user's loop, train(run_dir, settings) -> None
    device = "cpu"                                # auto | cpu | cuda[:N] (default: auto)
    seed = 0

    [tool.autohdr.overrides]                      # preset keys, as `autohdr debug --set`
    all = { "data.num_pairs" = 16 }               # every mode
    stage2_probe = { "train.epochs" = 3 }         # one mode (wins over `all`)

Every problem is a :class:`ConfigError` naming the file and key and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: The debug modes (``autohdr.runs.presets.MODES``; kept here so an unconfigured pytest never imports torch).
MODES: tuple[str, ...] = ("overfit_stage1", "stage2_probe", "stage3_probe")
#: Keys ``[tool.autohdr]`` accepts.
KEYS: tuple[str, ...] = ("model_factory", "modes", "data_root", "groups", "train", "device", "seed", "overrides")
#: The key of ``[tool.autohdr.overrides]`` that applies to every mode.
ALL_MODES = "all"


class ConfigError(ValueError):
    """A bad ``[tool.autohdr]`` value or ``--autohdr-*`` option (one line, naming the key)."""


@dataclass(frozen=True)
class PluginConfig:
    """What the plugin runs: one debug run per mode, judged signal by signal."""

    source: str                                   # where it came from ("/repo/pyproject.toml [tool.autohdr]")
    base_dir: Path                                # relative paths are taken from here
    model_factory: str | None = None              # MODULE:FUNCTION
    modes: tuple[str, ...] = MODES
    data_root: Path | None = None                 # None: autohdr's embedded fixtures
    groups: Mapping[str, str] | None = None       # group name -> module prefix(es) joined by "+"
    train: str | None = None                      # MODULE:FUNCTION of the user's loop; None: autohdr's Trainer
    device: str = "auto"
    seed: int = 0
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # mode or "all" -> {key: value}
    command_line: Mapping[str, Any] = field(default_factory=dict)  # --autohdr-set KEY=VALUE, every mode

    def mode_overrides(self, mode: str) -> dict[str, Any]:
        """The preset overrides of ``mode``: ``all`` first, then the mode's own, then ``--autohdr-set``."""
        return {**self.overrides.get(ALL_MODES, {}), **self.overrides.get(mode, {}), **self.command_line}

    def describe(self, mode: str) -> dict[str, Any]:
        """Everything that decides ``mode``'s run (JSON-able): the key of the shared run."""
        return {"mode": mode, "model_factory": self.model_factory, "train": self.train,
                "data_root": str(self.data_root) if self.data_root else None,
                "groups": dict(self.groups) if self.groups else None, "device": self.device, "seed": self.seed,
                "overrides": {k: v for k, v in sorted(self.mode_overrides(mode).items())}}


def read_table(pyproject: Path) -> dict[str, Any] | None:
    """``[tool.autohdr]`` of ``pyproject`` (``None`` when the file or the table is absent)."""
    if not pyproject.is_file():
        return None
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{pyproject} is not valid TOML: {exc}") from None
    table = data.get("tool", {}).get("autohdr")
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{pyproject}: tool.autohdr must be a table, got {type(table).__name__}")
    return table


def _callable_spec(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
        raise ConfigError(f"{where}: {key} must look like 'MODULE:FUNCTION', got {value!r}")
    return value


def _modes(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [m.strip() for m in value.split(",") if m.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: modes must be a non-empty list of {list(MODES)}, got {value!r}")
    unknown = [m for m in value if m not in MODES]
    if unknown:
        raise ConfigError(f"{where}: modes: unknown mode {unknown[0]!r}; expected some of {list(MODES)}")
    return tuple(dict.fromkeys(value))


def _device(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ConfigError(f"{where}: {key} must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}")
    return value


def _groups(value: Any, where: str) -> dict[str, str]:
    from autohdr.diagnosis.instrumentation import GROUP_NAMES

    if isinstance(value, str):  # the --groups text: backbone=a,param_head=b+c
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"{where}: groups must look like 'backbone=PREFIX,param_head=PREFIX', got {value!r}")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: groups must be a table of group = 'module.prefix', got {value!r}")
    for name, prefix in value.items():
        if name not in GROUP_NAMES:
            raise ConfigError(f"{where}: groups.{name}: unknown group; expected some of {list(GROUP_NAMES)}")
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"{where}: groups.{name} must be a module prefix string, got {prefix!r}")
    return dict(value)


def _overrides(value: Any, modes: tuple[str, ...], where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: overrides must be a table of mode = {{key = value}}, got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for mode, table in value.items():
        if mode not in MODES + (ALL_MODES,):
            raise ConfigError(f"{where}: overrides.{mode}: unknown mode; expected {ALL_MODES!r} or one of {list(MODES)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: overrides.{mode} must be a table of preset keys, got {table!r}")
        out[mode] = _flatten(table)
    return out


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"num_pairs": 16}}`` and ``{"data.num_pairs": 16}`` both as ``{"data.num_pairs": 16}``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def from_table(table: Mapping[str, Any], *, source: str, base_dir: Path) -> PluginConfig:
    """A :class:`PluginConfig` from a ``[tool.autohdr]`` table (``source`` names it in errors)."""
    unknown = [k for k in table if k not in KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; valid keys: {list(KEYS)}")
    values: dict[str, Any] = {}
    if "model_factory" in table:
        values["model_factory"] = _callable_spec(table["model_factory"], "model_factory", source)
    if "train" in table:
        values["train"] = _callable_spec(table["train"], "train", source)
    values["modes"] = _modes(table.get("modes", list(MODES)), source)
    if "data_root" in table:
        if not isinstance(table["data_root"], str) or not table["data_root"]:
            raise ConfigError(f"{source}: data_root must be a folder path string, got {table['data_root']!r}")
        values["data_root"] = (base_dir / Path(table["data_root"]).expanduser()).absolute()
    if "groups" in table:
        values["groups"] = _groups(table["groups"], source)
    if "device" in table:
        values["device"] = _device(table["device"], "device", source)
    if "seed" in table:
        if not isinstance(table["seed"], int) or isinstance(table["seed"], bool):
            raise ConfigError(f"{source}: seed must be an integer, got {table['seed']!r}")
        values["seed"] = table["seed"]
    if "overrides" in table:
        values["overrides"] = _overrides(table["overrides"], values["modes"], source)
    return PluginConfig(source=source, base_dir=base_dir, **values)


def with_options(config: PluginConfig, options: Mapping[str, Any], *, cwd: Path) -> PluginConfig:
    """``config`` with the ``--autohdr-*`` options that were given (``None``: not given) applied."""
    where = "command line"
    changes: dict[str, Any] = {}
    if options.get("model_factory"):
        changes["model_factory"] = _callable_spec(options["model_factory"], "--autohdr-model-factory", where)
    if options.get("train"):
        changes["train"] = _callable_spec(options["train"], "--autohdr-train", where)
    if options.get("modes"):
        changes["modes"] = _modes(options["modes"], f"{where}: --autohdr-modes")
    if options.get("data_root"):
        changes["data_root"] = (cwd / Path(options["data_root"]).expanduser()).absolute()
    if options.get("groups"):
        changes["groups"] = _groups(options["groups"], f"{where}: --autohdr-groups")
    if options.get("device"):
        changes["device"] = _device(options["device"], "--autohdr-device", where)
    if options.get("set"):
        extra = dict(config.command_line)
        for item in options["set"]:
            if "=" not in item:
                raise ConfigError(f"{where}: --autohdr-set {item!r} must look like KEY=VALUE")
            key, value = item.split("=", 1)
            extra[key.strip()] = value
        changes["command_line"] = extra
    return dataclasses.replace(config, **changes) if changes else config


def check(config: PluginConfig) -> None:
    """Refuse what only shows once everything is known: no model, a missing data root, a bad override,
    a ``model_factory`` or ``train`` that cannot be imported."""
    from autohdr.runs.debug import resolve_preset

    if not config.model_factory:
        raise ConfigError(f"{config.source}: model_factory is required ('MODULE:FUNCTION' returning your nn.Module)")
    if config.data_root is not None and not config.data_root.is_dir():
        raise ConfigError(f"{config.source}: data_root {config.data_root} is not a folder")
    for mode in config.modes:
        try:
            resolve_preset(mode, config.mode_overrides(mode), environ={})
        except ValueError as exc:
            raise ConfigError(f"{config.source}: overrides for {mode}: {exc}") from None
    from autohdr.testing.runs import resolve_callable

    for key in ("model_factory", "train"):  # imported now, so a typo stops pytest at start-up, not in every test
        if getattr(config, key):
            try:
                resolve_callable(getattr(config, key), key, config.base_dir)
            except ValueError as exc:
                raise ConfigError(f"{config.source}: {exc}") from None
