"""Data settings read from the environment, and where the embedded fixture data lives.

Variables (an unset or blank variable keeps the default):

==========================  ==============  ==========================================
variable                    field           format
==========================  ==============  ==========================================
``AUTOHDR_DATA_ROOT``       ``data_root``   folder of ``<id>_original`` / ``<id>_generated`` pairs
``AUTOHDR_SPLIT_DIR``       ``split_dir``   folder autohdr writes the split CSVs to (never read from)
``AUTOHDR_NUM_WORKERS``     ``num_workers`` integer >= 0
``AUTOHDR_BATCH_SIZE``      ``batch_size``  integer >= 1
``AUTOHDR_RESIZE_HW``       ``resize_hw``   ``"H,W"`` (integers >= 16) or ``"none"`` (full size)
``AUTOHDR_VAL_FRAC``        ``val_frac``    float strictly between 0 and 1
``AUTOHDR_SPLIT_SEED``      ``split_seed``  integer >= 0
``AUTOHDR_MAX_PAIRS``       ``max_pairs``   integer >= 1
``AUTOHDR_GROUP_REGEX``     ``group_regex`` regex with a named group ``group``, or ``"none"``
==========================  ==============  ==========================================

``AUTOHDR_MAX_IMAGE_PIXELS`` (read by :func:`max_image_pixels`, not a field): the largest image
autohdr decodes, in pixels (integer >= 1, or ``"none"`` for no limit); default
:data:`DEFAULT_MAX_IMAGE_PIXELS`, Pillow's own refusal point. Larger images are refused naming the
file and this variable; images above half of it get one notice line (Pillow's
``DecompressionBombWarning`` is never shown).

``AUTOHDR_SPLIT_DIR`` only receives files: autohdr writes ``train_split.csv`` / ``val_split.csv``
there and replaces them only when it wrote them itself and they are unchanged (see
:mod:`autohdr.data.split_files`). ``AUTOHDR_GROUP_REGEX`` names the photoshoot of a pair id (see
:func:`autohdr.data.pairs.pair_groups`): pairs of one photoshoot stay on one side of the split.

A malformed value raises ``ValueError`` naming the variable, the value and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

from autohdr.data.pairs import DEFAULT_GROUP_REGEX, compile_group_regex


#: Environment variable -> :class:`DataSettings` field.
ENV_VARS: dict[str, str] = {
    "AUTOHDR_DATA_ROOT": "data_root",
    "AUTOHDR_SPLIT_DIR": "split_dir",
    "AUTOHDR_NUM_WORKERS": "num_workers",
    "AUTOHDR_BATCH_SIZE": "batch_size",
    "AUTOHDR_RESIZE_HW": "resize_hw",
    "AUTOHDR_VAL_FRAC": "val_frac",
    "AUTOHDR_SPLIT_SEED": "split_seed",
    "AUTOHDR_MAX_PAIRS": "max_pairs",
    "AUTOHDR_GROUP_REGEX": "group_regex",
}
MIN_RESIZE = 16
_NO_RESIZE = ("none", "full", "off")
#: The variable that sets the largest image decoded (see :func:`max_image_pixels`).
MAX_IMAGE_PIXELS_VAR = "AUTOHDR_MAX_IMAGE_PIXELS"
#: Its default: 2 x Pillow's ``Image.MAX_IMAGE_PIXELS`` (89,478,485), where Pillow refuses to decode.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485


def max_image_pixels(environ: Mapping[str, str] = os.environ) -> int | None:
    """The largest image (width x height) autohdr decodes: ``AUTOHDR_MAX_IMAGE_PIXELS`` (``None``
    for ``"none"``: no limit), else :data:`DEFAULT_MAX_IMAGE_PIXELS`. A malformed value is a
    ``ValueError`` naming the variable."""
    raw = (environ.get(MAX_IMAGE_PIXELS_VAR) or "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    if raw.lower() in ("none", "off"):
        return None
    try:
        return _parse_int(raw, 1)
    except ValueError:
        raise ValueError(f"{MAX_IMAGE_PIXELS_VAR}={raw!r} is not valid: expected an integer >= 1 (pixels, "
                         f"e.g. 400000000), or 'none' for no limit") from None


def _parse_int(text: str, minimum: int) -> int:
    if "_" in text:  # Python's digit groups ("1_000"): refused, as in --set
        raise ValueError
    value = int(text)  # ValueError for "8.0", "eight", ""
    if value < minimum:
        raise ValueError
    return value


def _parse_resize(text: str) -> tuple[int, int] | None:
    if text.lower() in _NO_RESIZE:
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError
    h, w = (_parse_int(p.strip(), MIN_RESIZE) for p in parts)
    return h, w


def _parse_frac(text: str) -> float:
    if "_" in text:
        raise ValueError
    value = float(text)
    if not 0.0 < value < 1.0:  # also refuses nan and inf
        raise ValueError
    return value


def _parse_path(text: str) -> Path:
    return Path(text).expanduser()


def _parse_group_regex(text: str) -> str:
    compile_group_regex(text)  # ValueError when invalid or without the named group
    return text


#: field -> (parser, what a valid value looks like)
_PARSERS: dict[str, tuple[Callable[[str], object], str]] = {
    "data_root": (_parse_path, "a folder path"),
    "split_dir": (_parse_path, "a folder path"),
    "num_workers": (lambda t: _parse_int(t, 0), "an integer >= 0"),
    "batch_size": (lambda t: _parse_int(t, 1), "an integer >= 1"),
    "resize_hw": (_parse_resize, f"'H,W' with two integers >= {MIN_RESIZE} (e.g. '128,128'), or 'none'"),
    "val_frac": (_parse_frac, "a float strictly between 0 and 1"),
    "split_seed": (lambda t: _parse_int(t, 0), "an integer >= 0"),
    "max_pairs": (lambda t: _parse_int(t, 1), "an integer >= 1"),
    "group_regex": (_parse_group_regex, f"a regular expression with a named group 'group' "
                                        f"(e.g. '{DEFAULT_GROUP_REGEX}'), or 'none' to split by pair"),
}


@dataclass(frozen=True)
class DataSettings:
    """Where the data is and how it is loaded; every field can come from an ``AUTOHDR_*`` variable."""

    data_root: Path | None = None                     # pair folder; None: the caller's default (fixtures)
    split_dir: Path | None = None                     # where split CSVs go; None: the run folder
    num_workers: int = 0                              # DataLoader worker processes (0 on Windows)
    batch_size: int = 8
    resize_hw: tuple[int, int] | None = (128, 128)    # (H, W) images are resized to; None: full size
    val_frac: float = 0.2                             # validation share of a seeded split
    split_seed: int = 0                               # seed of pair selection and split
    max_pairs: int | None = None                      # use at most this many pairs; None: all
    group_regex: str | None = None                    # photoshoot of an id; None: the preset's (see pairs)

    def __post_init__(self) -> None:
        problems = []
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resize_hw is not None and (len(self.resize_hw) != 2 or min(self.resize_hw) < MIN_RESIZE):
            problems.append(f"resize_hw must be None or (H, W) with both >= {MIN_RESIZE}, got {self.resize_hw}")
        if not 0.0 < self.val_frac < 1.0:
            problems.append(f"val_frac must be strictly between 0 and 1, got {self.val_frac}")
        if self.split_seed < 0:
            problems.append(f"split_seed must be >= 0, got {self.split_seed}")
        if self.max_pairs is not None and self.max_pairs < 1:
            problems.append(f"max_pairs must be None or >= 1, got {self.max_pairs}")
        try:
            compile_group_regex(self.group_regex, "group_regex")
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("DataSettings: " + "; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "DataSettings":
        """Defaults overridden by every ``AUTOHDR_*`` variable that is set and not blank.

        >>> DataSettings.from_env({"AUTOHDR_BATCH_SIZE": "4", "AUTOHDR_RESIZE_HW": "96,128"}).resize_hw
        (96, 128)
        """
        values: dict[str, object] = {}
        for var, name in ENV_VARS.items():
            raw = environ.get(var)
            if raw is None or not raw.strip():
                continue
            parse, expected = _PARSERS[name]
            try:
                values[name] = parse(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not valid: expected {expected}") from None
        return cls(**values)


def ensure_kmp_duplicate_lib_ok(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set ``KMP_DUPLICATE_LIB_OK=TRUE`` where it is unset; a user's value is never overridden.

    Two OpenMP runtimes in one process (torch and numpy/MKL wheels on Windows and macOS) abort
    with "OMP: Error #15" unless this is set. Returns the value in effect.
    """
    return environ.setdefault("KMP_DUPLICATE_LIB_OK", "TRUE")


def repo_root() -> Path:
    """The checkout this package lives in (the parent of the ``autohdr`` folder)."""
    return Path(__file__).resolve().parents[2]


def default_fixture_root() -> Path:
    """The embedded fixture pairs, ``<repo>/fixtures/pairs``.

    Raises ``FileNotFoundError`` when missing (an installed, non-editable package has no fixtures).
    """
    root = repo_root() / "fixtures" / "pairs"
    if not root.is_dir():
        raise FileNotFoundError(
            f"embedded fixture data not found at {root}: regenerate it with "
            f"`python scripts/make_fixture_dataset.py --out fixtures --seed 0` in the checkout, "
            f"or point AUTOHDR_DATA_ROOT (or --data-root) at a folder of pairs")
    return root
