"""Pair discovery, split CSVs and the train/val split.

Data layout (the challenge's): one folder of ``<id>_original.<ext>`` (the distorted INPUT) and
``<id>_generated.<ext>`` (the corrected TARGET) files, ``<ext>`` one of ``jpg``, ``jpeg``, ``png``
(any case). Names starting with ``.`` (e.g. macOS ``._*`` files) are ignored. The data root is
read-only here: nothing in this package writes under it.

Every problem with the data raises :class:`DataError` (a ``ValueError``) naming the file or folder
and what is wrong. This module imports no torch, so the split tools (:func:`scan_pairs`,
:func:`prepare_overfit_split`) start in a fraction of a second.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
INPUT_TAG, TARGET_TAG = "original", "generated"
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "input_path", "target_path")
_PAIR_NAME = re.compile(r"^(?P<id>.+)_(?P<tag>original|generated)(?P<ext>\.(?:jpe?g|png))$", re.IGNORECASE)
_MAX_LISTED = 10


class DataError(ValueError):
    """Bad or missing data; the message names the file or folder and what is wrong."""


def _listing(items: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------- discovery and splits

def scan_pairs(data_root: str | Path) -> pd.DataFrame:
    """Find every ``<id>_original.*`` / ``<id>_generated.*`` pair directly inside ``data_root``.

    Returns:
        ``DataFrame`` with columns ``image_id, input_path, target_path`` (absolute path strings),
        sorted by ``image_id``, index ``0..N-1``.

    Raises:
        DataError: the root is missing or not a folder, holds no pairs, an id has two inputs or two
            targets, two ids differ only in letter case (``P005`` beside ``p005``; their files are
            named), or an input has no target (the expected target file is named). Targets without
            an input only warn.
    """
    root = Path(data_root).expanduser().absolute()
    if not root.exists():
        raise DataError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    found: dict[str, dict[str, list[Path]]] = {}
    for path in root.iterdir():
        match = _PAIR_NAME.match(path.name)
        if path.name.startswith(".") or match is None or not path.is_file():
            continue
        found.setdefault(match["id"], {INPUT_TAG: [], TARGET_TAG: []})[match["tag"].lower()].append(path)

    ambiguous = sorted(str(p) for files in found.values() for tag in files.values() if len(tag) > 1 for p in tag)
    if ambiguous:
        raise DataError(f"data root {root}: an id has more than one file of the same role: {_listing(ambiguous)}")
    _refuse_ids_differing_only_in_case(root, found)
    no_target = sorted(i for i, f in found.items() if f[INPUT_TAG] and not f[TARGET_TAG])
    if no_target:
        missing = [f"{found[i][INPUT_TAG][0].name} (expected {root / (i + '_' + TARGET_TAG)}.jpg, .jpeg or .png)"
                   for i in no_target]
        raise DataError(f"data root {root}: {len(no_target)} input(s) without a target file: {_listing(missing)}")
    no_input = sorted(i for i, f in found.items() if f[TARGET_TAG] and not f[INPUT_TAG])
    if no_input:
        warnings.warn(f"data root {root}: {len(no_input)} target(s) without an input ignored: "
                      f"{_listing([found[i][TARGET_TAG][0].name for i in no_input])}", stacklevel=2)
    ids = sorted(i for i, f in found.items() if f[INPUT_TAG] and f[TARGET_TAG])
    if not ids:
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = f" (it has subfolders {_listing(subdirs, 3)}: point at the folder holding the images)" if subdirs else ""
        raise DataError(f"no pairs found in data root {root}: expected files named <id>_{INPUT_TAG}.jpg|jpeg|png "
                        f"with a matching <id>_{TARGET_TAG}.jpg|jpeg|png{hint}")
    return pd.DataFrame({
        "image_id": ids,
        "input_path": [str(found[i][INPUT_TAG][0]) for i in ids],
        "target_path": [str(found[i][TARGET_TAG][0]) for i in ids],
    }, columns=list(SPLIT_COLUMNS))


def _refuse_ids_differing_only_in_case(root: Path, found: dict[str, dict[str, list[Path]]]) -> None:
    """``P005`` beside ``p005``: the same photo under two names on a case-sensitive file system (and one
    file on a case-insensitive one); training on both would count it twice."""
    by_folded: dict[str, list[str]] = {}
    for image_id in found:
        by_folded.setdefault(image_id.casefold(), []).append(image_id)
    clashes = [sorted(ids) for ids in by_folded.values() if len(ids) > 1]
    if not clashes:
        return
    first = clashes[0]
    files = [str(p) for image_id in first for tag in (INPUT_TAG, TARGET_TAG) for p in found[image_id][tag]]
    more = f" ({len(clashes) - 1} more such group(s))" if len(clashes) > 1 else ""
    raise DataError(f"data root {root}: ids {', '.join(map(repr, first))} differ only in letter case: "
                    f"{_listing(files)}{more}; rename or remove one so each photo has one id")


def _check_columns(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{what} is missing column(s) {missing} (needs {list(SPLIT_COLUMNS)}, "
                        f"has {list(map(str, df.columns))})")


def write_split_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``image_id, input_path, target_path`` (then any extra columns) to ``path``; returns it."""
    _check_columns(df, "split table")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [c for c in df.columns if c not in SPLIT_COLUMNS]
    df[list(SPLIT_COLUMNS) + extra].to_csv(path, index=False)
    return path


def read_split_csv(path: str | Path) -> pd.DataFrame:
    """Read a split CSV written by :func:`write_split_csv` and check it.

    Relative file paths are resolved against the CSV's folder. All cells are read as strings
    (an id like ``001`` stays ``"001"``).

    Raises:
        DataError: the CSV is missing, empty or unparsable, lacks a column (named), has blank
            cells, duplicate ``image_id`` values (named) or references files that do not exist (named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split CSV {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"split CSV {path} cannot be parsed: {exc}") from exc
    _check_columns(df, f"split CSV {path}")
    if df.empty:
        raise DataError(f"split CSV {path} has no rows")
    blank = [i + 2 for i in range(len(df)) if any(not str(df.at[i, c]).strip() for c in SPLIT_COLUMNS)]
    if blank:
        raise DataError(f"split CSV {path} has blank cells on line(s) {_listing(blank)}")
    dup = sorted(set(df["image_id"][df["image_id"].duplicated()]))
    if dup:
        raise DataError(f"split CSV {path} has duplicate image_id(s): {_listing(dup)}")
    for col in ("input_path", "target_path"):
        df[col] = [str(p if Path(p).is_absolute() else path.parent / p) for p in df[col]]
    missing = [p for col in ("input_path", "target_path") for p in df[col] if not Path(p).is_file()]
    if missing:
        raise DataError(f"split CSV {path} references {len(missing)} file(s) that do not exist: {_listing(missing)}")
    return df.reset_index(drop=True)


def train_val_split(df: pd.DataFrame, val_frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded disjoint split; both parts keep the input order and a fresh index.

    The validation part has ``round(len * val_frac)`` rows, at least 1 and at most ``len - 1`` when
    ``len >= 2`` (a single row goes to train and validation is empty).
    """
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be strictly between 0 and 1, got {val_frac}")
    n = len(df)
    if n == 0:
        raise DataError("cannot split an empty table of pairs")
    n_val = min(n - 1, max(1, int(round(n * val_frac)))) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return df.iloc[train_idx].reset_index(drop=True), df.iloc[val_idx].reset_index(drop=True)


def select_pairs(rows: pd.DataFrame, num_pairs: int, seed: int = 0, shuffle: bool = False) -> pd.DataFrame:
    """The first ``num_pairs`` rows (by id), or a seeded random ``num_pairs`` sorted by id (``shuffle``).

    Asking for more rows than exist returns them all.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if shuffle:
        pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:num_pairs])
        return rows.iloc[pick].reset_index(drop=True)
    return rows.iloc[:num_pairs].reset_index(drop=True)


def ensure_outside_data_root(path: str | Path, data_root: str | Path, what: str) -> None:
    """Refuse ``path`` (a folder something will be written to) when it lies in ``data_root``.

    Raises:
        DataError: naming ``what`` (e.g. ``"--out"``), the path and the root: the dataset is immutable.
    """
    root = Path(data_root).expanduser().absolute()
    target = Path(path).expanduser().absolute()
    if root.is_dir() and (target.resolve() == root.resolve() or root.resolve() in target.resolve().parents):
        raise DataError(f"{what} {target} is inside the data root {root}: the dataset is immutable, "
                        f"write outputs somewhere else")


def prepare_overfit_split(data_root: str | Path, out_dir: str | Path, num_pairs: int = 64, seed: int = 123,
                          shuffle: bool = False) -> dict[str, Any]:
    """Write ``train_split.csv`` and ``val_split.csv`` with the SAME rows (train == val on purpose).

    The rows are checked with :func:`validate_pairs` first. Also writes ``overfit_report.json``
    and returns its content: ``data_root, num_pairs_requested, num_pairs_available,
    num_pairs_written, seed, shuffle, train_split, val_split, image_ids, note`` (``note`` says when
    fewer pairs exist than were requested, else ``None``).

    Raises:
        ValueError: ``num_pairs < 1``.
        DataError: the data root is missing or has no pairs, bad pairs, or ``out_dir`` lies inside the
            data root (the dataset is immutable).
    """
    if num_pairs < 1:
        raise ValueError(f"number of pairs must be >= 1, got {num_pairs}")
    root = Path(data_root).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    ensure_outside_data_root(out, root, "out dir")
    rows = scan_pairs(root)
    chosen = select_pairs(rows, num_pairs, seed, shuffle)
    from autohdr.data.dataset import validate_pairs  # decoding lives there; imported late, no torch
    validate_pairs(chosen)
    note = None
    if len(chosen) < num_pairs:
        note = f"requested {num_pairs} pairs but only {len(rows)} exist in {root}; wrote {len(chosen)}"
    train_csv = write_split_csv(chosen, out / "train_split.csv")
    val_csv = write_split_csv(chosen, out / "val_split.csv")
    report = {
        "data_root": str(root), "num_pairs_requested": int(num_pairs), "num_pairs_available": len(rows),
        "num_pairs_written": len(chosen), "seed": int(seed), "shuffle": bool(shuffle),
        "train_split": str(train_csv), "val_split": str(val_csv),
        "image_ids": chosen["image_id"].tolist(), "note": note,
    }
    (out / "overfit_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
