"""Pair discovery, split CSVs, image decoding, the pair dataset and its loader.

Data layout (the challenge's): one folder of ``<id>_original.<ext>`` (the distorted INPUT) and
``<id>_generated.<ext>`` (the corrected TARGET) files, ``<ext>`` one of ``jpg``, ``jpeg``, ``png``
(any case). Names starting with ``.`` (e.g. macOS ``._*`` files) are ignored. The data root is
read-only here: nothing in this module writes under it.

Convention: images are ``(3, H, W)`` float32 in ``[0, 1]``, RGB, pixels in stored order (EXIF
orientation is not applied); a batch from :func:`make_loader` is ``(B, 3, H, W)``.

Every problem with the data raises :class:`DataError` (a ``ValueError``) naming the file or folder
and what is wrong. :func:`validate_pairs` checks every file's header up front so bad data fails
before training starts; a JPEG whose body is corrupt past its header can only be found on decode,
where :func:`load_image` raises :class:`DataError` naming the file.

torch is imported lazily (inside the functions that need it), so the split tools
(:func:`scan_pairs`, :func:`prepare_overfit_split`) start in a fraction of a second.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
INPUT_TAG, TARGET_TAG = "original", "generated"
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "input_path", "target_path")
_PAIR_NAME = re.compile(r"^(?P<id>.+)_(?P<tag>original|generated)(?P<ext>\.(?:jpe?g|png))$", re.IGNORECASE)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_TO_RGB_VIA_RGBA = ("P", "PA", "LA", "La", "RGBa")
_TO_RGB = ("1", "L", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_MAX_LISTED = 10
#: Bytes at the end of a file searched for the end marker (JPEG EOI, PNG IEND); allows short trailers.
_END_MARKER_WINDOW = 64 * 1024


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
            targets, or an input has no target (the expected target file is named). Targets without
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


# ----------------------------------------------------------------------------- decoding

def _check_resize(resize_hw) -> tuple[int, int] | None:
    if resize_hw is None:
        return None
    hw = tuple(int(v) for v in resize_hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"resize_hw must be None or (H, W) with positive ints, got {resize_hw!r}")
    return hw  # type: ignore[return-value]


def _decode(path: str | Path, resize_hw: tuple[int, int] | None, draft: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode to ``(3, H, W)`` float32 in ``[0, 1]``; also returns the stored size ``(W, H)``."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            stored_size = img.size
            if resize_hw is not None and draft and img.format == "JPEG":
                # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding, never below the requested size
                img.draft("RGB", (resize_hw[1], resize_hw[0]))
            img.load()  # inside the try: a truncated or corrupt body fails here
            if img.mode in _SIXTEEN_BIT_MODES:
                # 16-bit PNG/TIFF: scale by 65535 (not clipped at 255); PIL's "I" holds them too
                gray = np.asarray(img, dtype=np.float32) / 65535.0
                plane = Image.fromarray(np.clip(gray, 0.0, 1.0).astype(np.float32))
                if resize_hw is not None and plane.size != (resize_hw[1], resize_hw[0]):
                    plane = plane.resize((resize_hw[1], resize_hw[0]), Image.Resampling.BILINEAR)
                arr = np.repeat(np.asarray(plane, dtype=np.float32)[..., None], 3, axis=-1)
            else:
                if img.mode in _TO_RGB_VIA_RGBA:
                    rgb = img.convert("RGBA").convert("RGB")   # palette transparency handled, alpha dropped
                elif img.mode in _TO_RGB:
                    rgb = img.convert("RGB")
                elif img.mode == "RGB":
                    rgb = img
                else:
                    raise DataError(f"image file {path}: unsupported image mode {img.mode!r}")
                if resize_hw is not None and rgb.size != (resize_hw[1], resize_hw[0]):
                    rgb = rgb.resize((resize_hw[1], resize_hw[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(rgb, dtype=np.float32) / 255.0
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DataError(f"image file {path} cannot be decoded (corrupt or truncated?): {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), stored_size


def load_image(path: str | Path, resize_hw: tuple[int, int] | None = None, *, draft: bool = True) -> torch.Tensor:
    """Decode one image to ``(3, H, W)`` float32 RGB in ``[0, 1]``.

    Args:
        path: a JPEG or PNG (anything PIL reads). Gray, palette and RGBA images are converted to RGB
            (alpha dropped); 16-bit images are scaled by 65535.
        resize_hw: ``(H, W)`` to resize to (bilinear, antialiased when shrinking), or ``None``.
        draft: for JPEGs with ``resize_hw``, let the decoder downscale by a power of two first
            (``Image.draft``), never below the requested size; the final resize does the rest.

    Raises:
        DataError: the file is missing, corrupt or truncated (named in the message). Truncation is
            only detected while PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default).
    """
    image, _ = _decode(path, _check_resize(resize_hw), draft)
    return image


def _end_marker_problem(path: Path, fmt: str | None) -> str | None:
    """A truncation hint from the file's tail: JPEG must hold EOI (FFD9), PNG its IEND chunk."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is None:
        return None
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - _END_MARKER_WINDOW))
        tail = fh.read()
    if marker not in tail:
        return f"no {fmt} end marker at the end of the file (truncated?)"
    return None


def validate_pairs(rows: pd.DataFrame, max_check: int | None = None, *, decode: bool = False) -> int:
    """Check the first ``max_check`` rows (all by default) before training; returns how many were checked.

    Per pair: both files exist, their headers open, they end with their format's end marker (a
    cheap truncation check), and input and target have the same size; ids are unique. With
    ``decode=True`` every file is also fully decoded (slow, thorough).

    Raises:
        DataError: listing every problem found, each with its file.
    """
    _check_columns(rows, "pair table")
    if max_check is not None and max_check < 0:
        raise ValueError(f"max_check must be None or >= 0, got {max_check}")
    subset = rows if max_check is None else rows.iloc[:max_check]
    problems: list[str] = []
    dup = sorted(set(subset["image_id"][subset["image_id"].duplicated()]))
    if dup:
        problems.append(f"duplicate image_id(s): {_listing(dup)}")
    for row in subset.itertuples(index=False):
        sizes = {}
        for role, path in (("input", Path(row.input_path)), ("target", Path(row.target_path))):
            if not path.is_file():
                problems.append(f"{path}: {role} file of {row.image_id} does not exist")
                continue
            try:
                with Image.open(path) as img:
                    sizes[role], fmt = img.size, img.format
                    if decode:
                        img.load()
            except Exception as exc:
                problems.append(f"{path}: {role} of {row.image_id} cannot be read ({exc})")
                sizes.pop(role, None)
                continue
            hint = _end_marker_problem(path, fmt)
            if hint:
                problems.append(f"{path}: {role} of {row.image_id}: {hint}")
        if len(sizes) == 2 and sizes["input"] != sizes["target"]:
            (wi, hi), (wt, ht) = sizes["input"], sizes["target"]
            problems.append(f"{row.input_path} ({wi}x{hi}) and {row.target_path} ({wt}x{ht}): "
                            f"input and target sizes differ for {row.image_id}")
    if problems:
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {len(subset)} checked pair(s):\n  - {shown}{more}")
    return len(subset)


# ----------------------------------------------------------------------------- dataset and loader

class PairDataset:
    """Distorted/corrected pairs from a table with ``image_id, input_path, target_path``.

    A map-style dataset (``__len__`` and ``__getitem__``, all ``DataLoader`` and samplers need); it
    does not subclass ``torch.utils.data.Dataset`` so that this module imports without torch.

    ``__getitem__`` returns ``input_image`` and ``target_image`` ``(3, H, W)`` float32 in ``[0, 1]``
    plus ``image_id``, ``input_path`` and ``target_path`` (str). With ``resize_hw`` both images are
    resized to ``(H, W)``; input and target must have the same stored size either way.

    ``hflip`` (training only -- keep it off for validation) flips input and target together,
    horizontally, for about half the samples; the choice is a function of ``(seed, epoch, index)``
    only, so it is the same in every worker process. Call :meth:`set_epoch` to draw new flips per
    epoch (with persistent workers, only before the workers start).
    """

    def __init__(self, rows: pd.DataFrame, resize_hw: tuple[int, int] | None = None, hflip: bool = False,
                 seed: int = 0, *, draft: bool = True) -> None:
        _check_columns(rows, "pair table")
        if len(rows) == 0:
            raise DataError("PairDataset needs at least one pair, got an empty table")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        # plain lists: cheap to pickle into worker processes
        self.image_ids = [str(v) for v in rows["image_id"]]
        self.input_paths = [str(v) for v in rows["input_path"]]
        self.target_paths = [str(v) for v in rows["target_path"]]
        self.resize_hw = _check_resize(resize_hw)
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self.draft = bool(draft)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips :meth:`__getitem__` draws."""
        self.epoch = int(epoch)

    def flipped(self, index: int) -> bool:
        """Whether sample ``index`` is flipped in the current epoch (always ``False`` without ``hflip``)."""
        if not self.hflip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]  # IndexError past the end; negative indices allowed
        inp, inp_size = _decode(self.input_paths[index], self.resize_hw, self.draft)
        tgt, tgt_size = _decode(self.target_paths[index], self.resize_hw, self.draft)
        if inp_size != tgt_size:
            raise DataError(f"{self.input_paths[index]} ({inp_size[0]}x{inp_size[1]}) and "
                            f"{self.target_paths[index]} ({tgt_size[0]}x{tgt_size[1]}): input and target "
                            f"sizes differ for {self.image_ids[index]}")
        if self.flipped(index):
            inp, tgt = inp.flip(-1), tgt.flip(-1)
        return {"input_image": inp, "target_image": tgt, "image_id": self.image_ids[index],
                "input_path": self.input_paths[index], "target_path": self.target_paths[index]}


def _seed_worker(worker_id: int) -> None:
    """Seed numpy in each worker from torch's per-worker seed (itself from the loader's generator)."""
    import torch
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(dataset: PairDataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` with a seeded generator (same order for the same seed) and the default collate.

    Batches are dicts: images ``(B, 3, H, W)``, ``image_id`` / ``input_path`` / ``target_path`` lists.
    """
    import torch
    from torch.utils.data import DataLoader
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, worker_init_fn=_seed_worker if num_workers > 0 else None,
                      persistent_workers=num_workers > 0)
