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

import errno
import json
import os
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


class DataNotice(UserWarning):
    """Something about the data a run should say in one line and then go on with (``autohdr`` prints
    it as ``autohdr: notice: ...``): fewer pairs than asked, targets without an input."""


def fewer_pairs_notice(asked: int, found: int, used: int, root: str | Path) -> str | None:
    """The one line that says a run uses fewer pairs than ``data.num_pairs`` asked, else ``None``."""
    if used >= asked:
        return None
    return (f"data.num_pairs={asked} asked, but {found} pair(s) found in {root}: the run uses {used} "
            f"(report.json 'pairs' and report.html say so)")


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
        DataError: the root is missing or not a folder, holds no pairs, an image name is a symlink
            that leads to no file (broken, looping; named with its target), an id has two inputs or two
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
    dangling: list[str] = []
    for path in root.iterdir():
        match = _PAIR_NAME.match(path.name)
        if path.name.startswith(".") or match is None:
            continue
        if not path.is_file():
            if path.is_symlink():
                dangling.append(_dangling_link(path))
            continue
        found.setdefault(match["id"], {INPUT_TAG: [], TARGET_TAG: []})[match["tag"].lower()].append(path)
    if dangling:
        raise DataError(f"data root {root}: {len(dangling)} image link(s) lead to no file: {_listing(sorted(dangling))}; "
                        f"fix or remove them")

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
                      f"{_listing([found[i][TARGET_TAG][0].name for i in no_input])}", DataNotice, stacklevel=2)
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


def _dangling_link(path: Path) -> str:
    """``name -> target (why)`` for a symlink that leads to no file (broken, looping, or a folder)."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        path.stat()
    except OSError as exc:
        why = "a symlink loop" if exc.errno == errno.ELOOP else "its target does not exist"
    else:
        why = "its target is not a file"
    return f"{path.name} -> {target} ({why})"


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


def split_csv_text(df: pd.DataFrame) -> str:
    """The CSV text of a split table: ``image_id, input_path, target_path``, then any extra columns."""
    _check_columns(df, "split table")
    extra = [c for c in df.columns if c not in SPLIT_COLUMNS]
    return df[list(SPLIT_COLUMNS) + extra].to_csv(index=False)


def write_split_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write :func:`split_csv_text` of ``df`` to ``path`` (the caller's chosen file); returns it.

    autohdr's own split folders go through :func:`autohdr.data.split_files.write_owned_files`,
    which never replaces a file autohdr did not write.
    """
    text = split_csv_text(df)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
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


#: Default photoshoot pattern: ids ``<group>_g<k>`` (``k`` digits) belong to photoshoot ``<group>``.
DEFAULT_GROUP_REGEX = r"^(?P<group>.+)_g\d+$"
#: Values of a group regex that switch grouping off (every pair is its own group).
NO_GROUPING: tuple[str, ...] = ("", "none")


def compile_group_regex(pattern: str | None, where: str = "group regex") -> re.Pattern[str] | None:
    """``pattern`` compiled, or ``None`` when grouping is off (``None``, ``""`` or ``"none"``).

    Raises:
        ValueError: naming ``where`` and the pattern, when it is not a valid regular expression or
            has no named group ``group`` (the part of an id that names its photoshoot).
    """
    if pattern is None or pattern.strip().lower() in NO_GROUPING:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where} {pattern!r} is not a valid regular expression ({exc})") from None
    if "group" not in compiled.groupindex:
        raise ValueError(f"{where} {pattern!r} has no named group 'group': mark the part of an id that names "
                         f"its photoshoot, e.g. '{DEFAULT_GROUP_REGEX}', or pass 'none' to split by pair")
    return compiled


def pair_groups(image_ids: Sequence[Any], pattern: str | None = DEFAULT_GROUP_REGEX) -> list[str]:
    """The photoshoot group of each id: the ``group`` match of ``pattern`` (``re.search``), else the id.

    An id that does not match (or whose ``group`` does not take part in the match) is its own
    group, so with ``pattern=None`` every pair is its own group.

    >>> pair_groups(["a1_g0", "a1_g1", "b7_g0", "lone"])
    ['a1', 'a1', 'b7', 'lone']
    """
    compiled = compile_group_regex(pattern)
    groups = []
    for image_id in map(str, image_ids):
        match = compiled.search(image_id) if compiled is not None else None
        groups.append(match["group"] if match is not None and match["group"] is not None else image_id)
    return groups


def train_val_split(df: pd.DataFrame, val_frac: float, seed: int,
                    group_regex: str | None = DEFAULT_GROUP_REGEX) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded disjoint split by photoshoot group; both parts keep the input order and a fresh index.

    Pairs of one group (:func:`pair_groups` of ``image_id`` with ``group_regex``) always land on
    the same side, so no photoshoot is in both training and validation. The validation target is
    ``round(len * val_frac)`` rows, at least 1 and at most ``len - 1`` when ``len >= 2`` (a single
    row goes to train and validation is empty). The groups, in order of first appearance, are
    permuted with ``seed``; each group joins validation when it still fits under the target, so
    validation holds at most the target (fewer when the groups do not add up to it exactly), and
    when even the first group is larger than the target, validation is that group alone. With one
    pair per group this is the plain per-pair split: the first ``target`` pairs of a seeded
    permutation.

    Raises:
        ValueError: ``val_frac`` not in ``(0, 1)``, or an invalid ``group_regex``.
        DataError: an empty table, or two or more pairs that all belong to one group.
    """
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be strictly between 0 and 1, got {val_frac}")
    n = len(df)
    if n == 0:
        raise DataError("cannot split an empty table of pairs")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(pair_groups(df["image_id"].tolist(), group_regex)):
        members.setdefault(group, []).append(index)
    groups = list(members.values())
    if n >= 2 and len(groups) < 2:
        raise DataError(f"all {n} pairs belong to one photoshoot group {next(iter(members))!r} (group regex "
                        f"'{group_regex}'): a train/val split needs two groups; pass a --group-regex that "
                        f"separates the photoshoots, or 'none' to split by pair")
    target = min(n - 1, max(1, int(round(n * val_frac)))) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(len(groups))
    val: list[int] = []
    for g in order:
        if len(val) + len(groups[g]) <= target:
            val.extend(groups[g])
    if not val and target:
        val = list(groups[order[0]])
    in_val = np.zeros(n, dtype=bool)
    in_val[val] = True
    train_rows, val_rows = df.iloc[np.flatnonzero(~in_val)], df.iloc[np.flatnonzero(in_val)]
    return train_rows.reset_index(drop=True), val_rows.reset_index(drop=True)


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

    The files go through :func:`autohdr.data.split_files.write_owned_files`: existing files of
    these names are replaced only when autohdr wrote them and they are unchanged since.

    The rows are checked with :func:`validate_pairs` first. Also writes ``overfit_report.json``
    and returns its content: ``data_root, num_pairs_requested, num_pairs_available,
    num_pairs_written, seed, shuffle, train_split, val_split, image_ids, note`` (``note`` says when
    fewer pairs exist than were requested, else ``None``).

    Raises:
        ValueError: ``num_pairs < 1``.
        DataError: the data root is missing or has no pairs, bad pairs, ``out_dir`` lies inside the
            data root (the dataset is immutable), or it holds a split file autohdr did not write
            (or that changed since).
    """
    if num_pairs < 1:
        raise ValueError(f"number of pairs must be >= 1, got {num_pairs}")
    root = Path(data_root).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    ensure_outside_data_root(out, root, "out dir")
    from autohdr.data.split_files import check_replaceable, write_owned_files  # imports this module
    names = ("train_split.csv", "val_split.csv", "overfit_report.json")
    check_replaceable(out, names)  # before decoding every image: a refusal comes at once
    rows = scan_pairs(root)
    chosen = select_pairs(rows, num_pairs, seed, shuffle)
    from autohdr.data.dataset import validate_pairs  # decoding lives there; imported late, no torch
    validate_pairs(chosen)
    note = None
    if len(chosen) < num_pairs:
        note = f"requested {num_pairs} pairs but only {len(rows)} exist in {root}; wrote {len(chosen)}"
    report = {
        "data_root": str(root), "num_pairs_requested": int(num_pairs), "num_pairs_available": len(rows),
        "num_pairs_written": len(chosen), "seed": int(seed), "shuffle": bool(shuffle),
        "train_split": str(out / names[0]), "val_split": str(out / names[1]),
        "image_ids": chosen["image_id"].tolist(), "note": note,
    }
    csv = split_csv_text(chosen)
    write_owned_files(out, {names[0]: csv, names[1]: csv, names[2]: json.dumps(report, indent=2)})
    return report
