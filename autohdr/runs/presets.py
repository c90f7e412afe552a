"""Debug-mode presets: readable TOML files (``autohdr/presets/<mode>.toml``) turned into typed configs.

A preset has four tables: ``[data]`` (:class:`DataPreset`), ``[train]``
(:class:`~autohdr.training.config.TrainConfig`), ``[model]`` (:class:`~autohdr.lens.model.ModelConfig`) and
``[judge]`` (:class:`~autohdr.diagnosis.verdicts.JudgeConfig`). Unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from autohdr.data.pairs import DEFAULT_GROUP_REGEX, compile_group_regex
from autohdr.training.config import TrainConfig, apply_overrides, from_mapping, split_override
from autohdr.lens.model import ModelConfig
from autohdr.diagnosis.verdicts import JudgeConfig

PRESET_DIR = Path(__file__).parent / "presets"
MODES: tuple[str, ...] = ("overfit_stage1", "stage2_probe", "stage3_probe")


@dataclass(frozen=True)
class DataPreset:
    """Which pairs a debug mode trains and validates on."""

    num_pairs: int = 32                          # pairs taken from the data root
    overfit: bool = True                         # train == val (the overfit check); else a seeded split
    resize_hw: tuple[int, int] = (128, 128)      # training resolution (H, W)
    batch_size: int = 8
    num_workers: int = 0
    hflip: bool = False                          # training-only horizontal flip
    val_frac: float = 0.2                        # used when overfit is false
    split_seed: int = 0                          # pair selection and split seed
    shuffle_pairs: bool = False                  # False: the first num_pairs by id
    group_regex: str | None = DEFAULT_GROUP_REGEX  # photoshoot of an id (named group 'group'); "none": by pair

    def __post_init__(self) -> None:
        compile_group_regex(self.group_regex, "data.group_regex")
        if self.num_pairs < 1 or self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"data: num_pairs and batch_size must be >= 1 and num_workers >= 0, got "
                             f"{self.num_pairs}, {self.batch_size}, {self.num_workers}")
        if len(self.resize_hw) != 2 or min(self.resize_hw) < 16:
            raise ValueError(f"data.resize_hw must be (H, W) with both >= 16, got {self.resize_hw}")
        if not 0.0 < self.val_frac < 1.0:
            raise ValueError(f"data.val_frac must be in (0, 1), got {self.val_frac}")


@dataclass(frozen=True)
class DebugPreset:
    mode: str = "custom"
    runbook_name: str = ""
    description: str = ""
    data: DataPreset = field(default_factory=DataPreset)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


def preset_path(mode_or_path: str | Path) -> Path:
    """The TOML file of a mode name, or ``mode_or_path`` itself when it is a file."""
    candidate = Path(mode_or_path)
    if candidate.suffix == ".toml":
        if not candidate.is_file():
            raise ValueError(f"preset file {candidate} does not exist")
        return candidate
    if str(mode_or_path) not in MODES + ("train",):
        raise ValueError(f"unknown debug mode {str(mode_or_path)!r}; expected one of {list(MODES)} "
                         "or a path to a preset .toml file")
    return PRESET_DIR / f"{mode_or_path}.toml"


def load_preset(mode_or_path: str | Path, overrides: list[str] | dict | None = None) -> DebugPreset:
    """Read a preset and apply ``key=value`` overrides (``train.lr=1e-3``; bare keys mean ``train.*``)."""
    path = preset_path(mode_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"preset {path} is not valid TOML: {exc}") from None
    return override_preset(from_mapping(DebugPreset, raw, where=str(path)), overrides)


def override_preset(preset: DebugPreset, overrides: list[str] | dict | None) -> DebugPreset:
    """``preset`` with ``key=value`` overrides applied (bare keys mean ``train.*``)."""
    return apply_overrides(preset, _qualify(overrides))


def _qualify(overrides: list[str] | dict | None):
    """Prefix bare keys with ``train.`` (the table most overrides touch)."""
    if not overrides:
        return overrides
    tables = ("data", "train", "model", "judge")  # mode, runbook_name, description are not overridable
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    qualified = {}
    for key, value in items:
        head = key.split(".", 1)[0]
        qualified[key if head in tables else f"train.{key}"] = value
    return qualified

