"""Typed training configuration and the three training stages.

``TrainConfig`` is frozen; change it with :func:`apply_overrides` (``key=value`` strings, as
``--set`` passes them), which refuses keys that do not exist so a typo fails loudly. Values are
refused by name too: a float that is not finite (``inf``, ``nan``, ``1e999``; in ``--set``, preset
files and Python overrides alike), a number for a boolean (``true``/``false``, ``yes``/``no``,
``on``/``off`` only), and Python's underscore digit groups (``1_000``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from autohdr.lens.losses import LossWeights
from autohdr.lens.stages import STAGES, StageSpec, stage_spec  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer needs besides the model and the data."""

    stage: str = "stage1_param_only"        # one of STAGES
    epochs: int = 4                          # passes over the training loader
    max_steps_per_epoch: int | None = None   # cap on optimizer steps per epoch (None: whole loader)
    validate_every: int = 1                  # validate (and write last.pt, keep best.pt) every N epochs and after the last;
                                             # capped at epochs // 4, so a short run still validates 4 times
    lr: float = 2e-3                         # peak AdamW learning rate (times the stage's lr_scale)
    weight_decay: float = 1e-4               # AdamW decoupled weight decay
    warmup_steps: int = 0                    # linear warm-up before the cosine decay
    min_lr_ratio: float = 0.1                # cosine floor, as a fraction of the peak
    grad_clip_norm: float = 5.0              # global gradient-norm clip (norms are logged before it)
    amp: bool = True                         # mixed precision (bfloat16 autocast), CUDA only
    channels_last: bool = False              # channels_last model and inputs, CUDA only (CPU backward crashes)
    seed: int = 0                            # seeds torch; CPU runs are deterministic
    log_interval: int = 10                   # steps between human log lines
    progress: bool = True                    # tqdm progress bar on the step loop
    loss_weights: LossWeights = field(default_factory=LossWeights)
    ddp_broadcast_buffers: bool = True       # under torchrun: DDP copies rank 0's buffers every forward
    # Instrumentation (the runbook's diagnostics)
    debug_instrumentation: bool = False      # per-step gradient norms, deltas, geometry, probe
    debug_perf_enabled: bool = False         # per-step timings and throughput
    debug_perf_warmup_steps: int = 3         # steps excluded from the run's samples/sec
    debug_residual_inactive_threshold_px: float = 0.05  # residual contribution below this is "inactive"
    debug_residual_inactive_patience: int = 20          # consecutive inactive steps before a warning
    debug_probe_max_samples: int = 4         # fixed probe: the first N validation samples
    debug_checksum_decimals: int = 4         # probe checksums round to this many decimals first

    def __post_init__(self) -> None:
        stage_spec(self.stage)
        for name in ("epochs", "validate_every", "debug_probe_max_samples", "debug_residual_inactive_patience", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or None, got {self.max_steps_per_epoch}")
        if self.lr < 0 or self.grad_clip_norm <= 0:
            raise ValueError(f"lr must be >= 0 and grad_clip_norm > 0, got lr={self.lr}, "
                             f"grad_clip_norm={self.grad_clip_norm}")

    @property
    def spec(self) -> StageSpec:
        return stage_spec(self.stage)

    @property
    def validation_interval(self) -> int:
        """Epochs between validations: ``validate_every``, at most ``epochs // 4`` (at least 1)."""
        return max(1, min(self.validate_every, self.epochs // 4))


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able values (tuples become lists)."""
    return dataclasses.asdict(config)


#: The words a boolean ``--set`` value may be (any case); numbers are refused: ``data.overfit=1`` is
#: more likely a typo for another key than a way of writing ``true``.
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on"), ("false", "no", "off")


def _number(text: str, kind: type) -> int | float:
    """``kind(text)`` for an ``int`` or ``float`` ``--set`` value, written as a plain literal: Python's
    underscore digit groups (``1_000``) are refused, so a typo cannot read as a number."""
    if "_" in text:
        raise ValueError(f"underscores are not accepted in numbers (write {text.replace('_', '')!r})")
    return kind(text)


def _coerce(text: str, current: Any, key: str) -> Any:
    """Parse ``text`` into the type of ``current`` (the field's present value)."""
    lowered = text.strip().lower()
    if isinstance(current, bool):
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise ValueError(f"{key}: expected true/false (or yes/no, on/off), got {text!r}")
    if lowered in ("none", "null"):
        return None
    try:
        if isinstance(current, int):
            return _number(text.strip(), int)
        if isinstance(current, float):
            return _number(text.strip(), float)
        if isinstance(current, tuple):
            parts = [p for p in text.strip().strip("[]()").replace("x", ",").split(",") if p.strip()]
            kind = type(current[0]) if current else float
            return tuple(_number(p.strip(), kind) for p in parts)
    except ValueError as exc:
        example = " (e.g. " + ",".join(str(v) for v in current) + ")" if isinstance(current, tuple) else ""
        why = f": {exc}" if str(exc).startswith("underscores") else ""
        raise ValueError(f"{key}: expected {type(current).__name__}{example}, got {text!r}{why}") from None
    if current is None:  # optional field currently unset: accept ints, floats, or text
        for kind in (int, float):
            try:
                return _number(text.strip(), kind)
            except ValueError:
                pass
    return text


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return "a table" if dataclasses.is_dataclass(hint) else hint.__name__
    return str(hint).replace("NoneType", "None")


def typed_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` as field type ``hint`` asks (ints serve floats, lists serve tuples, a mapping
    serves a nested config), else ``ValueError`` naming ``key``, the expected type and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return typed_value(value, arg, key)
            except ValueError:
                continue
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed_value(v, args[0], key) for v in value)
        if len(value) == len(args):
            return tuple(typed_value(v, a, key) for v, a in zip(value, args))
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            # no setting takes inf or nan: a learning rate, a weight, a threshold or a clip norm of inf
            # or nan breaks training or judging instead of switching something off
            raise ValueError(f"{key}: expected a finite float, got {value!r}")
        return float(value)
    elif hint is str and isinstance(value, str):
        return value
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_mapping(hint, value, key)
    elif hint is Any:
        return value
    raise ValueError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def from_mapping(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ValueError(f"unknown key {key!r} in {where}; expected one of {sorted(hints)}")
        kwargs[key] = typed_value(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def apply_overrides(config: Any, overrides: list[str] | dict[str, Any] | None) -> Any:
    """Return ``config`` with ``key=value`` (or ``a.b=value`` for nested dataclasses) replaced.

    Unknown keys raise ``ValueError`` naming the key and the valid ones.
    """
    if not overrides:
        return config
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides)
    for key, value in items:
        config = _replace_path(config, key.split("."), value, key)
    return config


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def _replace_path(config: Any, path: list[str], value: Any, full_key: str) -> Any:
    names = {f.name for f in dataclasses.fields(config)}
    head = path[0]
    if head not in names:
        raise ValueError(f"unknown config key {full_key!r}; valid keys here: {sorted(names)}")
    current = getattr(config, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full_key!r}: {head!r} has no sub-keys")
        return dataclasses.replace(config, **{head: _replace_path(current, path[1:], value, full_key)})
    if isinstance(value, str):
        value = _coerce(value, current, full_key)
    value = typed_value(value, typing.get_type_hints(type(config))[head], full_key)
    return dataclasses.replace(config, **{head: value})
