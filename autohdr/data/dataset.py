"""Image decoding, pair validation, the pair dataset and its loader.

Convention: images are ``(3, H, W)`` float32 in ``[0, 1]``, RGB, upright: the EXIF orientation
tag is applied on load (``ImageOps.exif_transpose``, inputs and targets alike), as every image
viewer does; a batch from :func:`make_loader` is ``(B, 3, H, W)``. Sizes are the upright sizes.

Images smaller than :data:`MIN_IMAGE_SIDE` pixels on a side, or larger than
:func:`~autohdr.data.settings.max_image_pixels` (``AUTOHDR_MAX_IMAGE_PIXELS``), are refused naming
the file; Pillow's ``DecompressionBombWarning`` is never shown (the validation pass says one
line per very large file instead).

:func:`validate_pairs` checks every file's header up front so bad data fails before training
starts; a JPEG whose body is corrupt past its header can only be found on decode, where
:func:`load_image` raises :class:`~autohdr.data.pairs.DataError` naming the file. torch is
imported lazily (inside the functions that need it).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from autohdr.data.pairs import DataError, DataNotice, _check_columns, _listing
from autohdr.data.settings import MAX_IMAGE_PIXELS_VAR, max_image_pixels

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_TO_RGB_VIA_RGBA = ("P", "PA", "LA", "La", "RGBa")
_TO_RGB = ("1", "L", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
#: Bytes at the end of a file searched for the end marker (JPEG EOI, PNG IEND); allows short trailers.
_END_MARKER_WINDOW = 64 * 1024

#: The smallest image side accepted (stored size): below it there are no lines to straighten.
MIN_IMAGE_SIDE = 16
#: EXIF tag 274: how the stored pixels must be turned to show the photo upright (1 = as stored).
EXIF_ORIENTATION_TAG = 0x0112
#: Orientations that swap width and height (a quarter turn, with or without a mirror).
_QUARTER_TURNS = (5, 6, 7, 8)
_ORIENTATION_NAMES = {1: "upright", 2: "mirrored", 3: "rotated 180", 4: "mirrored vertically",
                      5: "transposed", 6: "rotated 90 (turn clockwise)", 7: "transversed",
                      8: "rotated 270 (turn counter-clockwise)"}

# ----------------------------------------------------------------------------- opening

def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when it has none or an invalid one."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block: the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def orientation_name(value: int) -> str:
    return f"EXIF orientation {value} ({_ORIENTATION_NAMES.get(value, 'unknown')})"


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(W, H)`` of the image as shown upright (its EXIF orientation applied)."""
    width, height = img.size
    return (height, width) if exif_orientation(img) in _QUARTER_TURNS else (width, height)


def _size_problem(path: Path, size: tuple[int, int], limit: int | None, min_side: int) -> str | None:
    """Why an image of stored ``size`` ``(W, H)`` is refused, or ``None``."""
    width, height = size
    if min(width, height) < min_side:
        return (f"image file {path} is {width}x{height} pixels: images must be at least {MIN_IMAGE_SIDE}x"
                f"{MIN_IMAGE_SIDE} (stored size)")
    if limit is not None and width * height > limit:
        return (f"image file {path} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit "
                f"of {limit / 1e6:.1f} MP: set {MAX_IMAGE_PIXELS_VAR}={width * height} (or 'none') to decode it")
    return None


def _large_image_notice(path: Path, size: tuple[int, int], limit: int | None) -> str | None:
    """One line for an image above half the pixel limit (where Pillow would warn), else ``None``."""
    width, height = size
    if limit is None or width * height <= limit // 2:
        return None
    return (f"image file {path} is {width}x{height} = {width * height / 1e6:.1f} megapixels, a very large image "
            f"(decoding is slow; the limit is {limit / 1e6:.1f} MP, {MAX_IMAGE_PIXELS_VAR})")


@contextlib.contextmanager
def open_image(path: str | Path, min_side: int = 0) -> Iterator[Image.Image]:
    """``Image.open(path)`` under autohdr's size rules: refused (:class:`DataError` naming the file)
    with a side below ``min_side`` (the data pipeline passes :data:`MIN_IMAGE_SIDE`) or above
    ``AUTOHDR_MAX_IMAGE_PIXELS``; Pillow's own pixel limit and its ``DecompressionBombWarning`` are
    switched off meanwhile (this check replaces them)."""
    path = Path(path)
    limit = max_image_pixels()
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as img:
                problem = _size_problem(path, img.size, limit, min_side)
                if problem:
                    raise DataError(problem)
                yield img
        finally:
            Image.MAX_IMAGE_PIXELS = previous


# ----------------------------------------------------------------------------- decoding

def _check_resize(resize_hw) -> tuple[int, int] | None:
    if resize_hw is None:
        return None
    hw = tuple(int(v) for v in resize_hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"resize_hw must be None or (H, W) with positive ints, got {resize_hw!r}")
    return hw  # type: ignore[return-value]


def _decode(path: str | Path, resize_hw: tuple[int, int] | None, draft: bool,
            min_side: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode to ``(3, H, W)`` float32 in ``[0, 1]``, upright; also returns the full upright size ``(W, H)``
    (the stored size, turned by the EXIF orientation)."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    try:
        with open_image(path, min_side) as opened:
            width, height = opened.size
            if resize_hw is not None and draft and opened.format == "JPEG":
                # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding, never below the requested size
                # (asked in stored orientation)
                turned = exif_orientation(opened) in _QUARTER_TURNS
                opened.draft("RGB", (resize_hw[0], resize_hw[1]) if turned else (resize_hw[1], resize_hw[0]))
            opened.load()  # inside the try: a truncated or corrupt body fails here
            # a PNG's EXIF can follow its pixels: the orientation is read once they are loaded
            stored_size = (height, width) if exif_orientation(opened) in _QUARTER_TURNS else (width, height)
            img = ImageOps.exif_transpose(opened)  # upright, as a viewer shows it (a copy when it turns)
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


class DecodedImages:
    """Decoded images kept in memory, so a small subset trained for many epochs is decoded once.

    Holds what :func:`_decode` returns (a ``(3, H, W)`` float32 tensor and the stored size) per
    ``(path, resize_hw, draft)`` until ``max_bytes`` of pixels are held; later images are decoded each
    time they are asked for. One instance may serve several datasets (the overfit modes' train and
    val sets are the same pairs). The files are only read; a worker process gets its own copy.
    Callers must not write into the returned tensor (the loader's collate stacks a copy).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.held_bytes = 0
        self._images: dict[tuple[str, tuple[int, int] | None, bool], tuple[torch.Tensor, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self._images)

    def decode(self, path: str | Path, resize_hw: tuple[int, int] | None, draft: bool,
               min_side: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        """:func:`_decode`, from memory when this image was decoded before."""
        key = (str(path), resize_hw, draft)
        held = self._images.get(key)
        if held is not None:
            return held
        decoded = _decode(path, resize_hw, draft, min_side)
        size = decoded[0].numel() * decoded[0].element_size()
        if self.held_bytes + size <= self.max_bytes:
            self._images[key] = decoded
            self.held_bytes += size
        return decoded


def image_orientation(path: str | Path) -> int:
    """The EXIF orientation (1-8) of the image file ``path`` (header only)."""
    with open_image(path) as img:
        return exif_orientation(img)


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
    cheap truncation check), they are neither smaller than :data:`MIN_IMAGE_SIDE` nor larger
    than ``AUTOHDR_MAX_IMAGE_PIXELS``, and input and target have the same upright size (EXIF
    orientation applied; a mismatch that the tags explain says so); ids are unique. With
    ``decode=True`` every file is also fully decoded (slow, thorough).

    Notices (:class:`~autohdr.data.pairs.DataNotice`, one line each): a very large image (above
    half the pixel limit), and the pairs whose two files carry different EXIF orientations.

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
    limit = max_image_pixels()
    turned_pairs: list[str] = []
    for row in subset.itertuples(index=False):
        sizes, stored, orientation = {}, {}, {}
        for role, path in (("input", Path(row.input_path)), ("target", Path(row.target_path))):
            if not path.is_file():
                problems.append(f"{path}: {role} file of {row.image_id} does not exist")
                continue
            try:
                with open_image(path, MIN_IMAGE_SIDE) as img:
                    stored[role], fmt = img.size, img.format
                    if decode:
                        img.load()
                    orientation[role] = exif_orientation(img)
                    sizes[role] = upright_size(img)
            except DataError as exc:  # too small or too large: the message names the file
                problems.append(f"{exc} ({role} of {row.image_id})")
                continue
            except Exception as exc:
                problems.append(f"{path}: {role} of {row.image_id} cannot be read ({exc})")
                sizes.pop(role, None)
                continue
            notice = _large_image_notice(path, stored[role], limit)
            if notice:
                warnings.warn(notice, DataNotice, stacklevel=2)
            hint = _end_marker_problem(path, fmt)
            if hint:
                problems.append(f"{path}: {role} of {row.image_id}: {hint}")
        if len(orientation) == 2 and orientation["input"] != orientation["target"]:
            turned_pairs.append(f"{row.image_id} (input {orientation['input']}, target {orientation['target']})")
        if len(sizes) == 2 and sizes["input"] != sizes["target"]:
            (wi, hi), (wt, ht) = sizes["input"], sizes["target"]
            exif = ""
            if orientation["input"] != orientation["target"]:
                exif = (f" after their EXIF orientation is applied (input: {orientation_name(orientation['input'])}, "
                        f"target: {orientation_name(orientation['target'])}"
                        + ("; as stored they would match: is one tag wrong?)" if stored["input"] == stored["target"]
                           else ")"))
            problems.append(f"{row.input_path} ({wi}x{hi}) and {row.target_path} ({wt}x{ht}): "
                            f"input and target sizes differ for {row.image_id}{exif}")
    if turned_pairs and not problems:
        warnings.warn(f"{len(turned_pairs)} pair(s) whose input and target carry different EXIF orientations "
                      f"(both are shown upright, as a viewer does; check that the tags are right): "
                      f"{_listing(turned_pairs)}", DataNotice, stacklevel=2)
    if problems:
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {len(subset)} checked pair(s):\n  - {shown}{more}")
    return len(subset)


# ----------------------------------------------------------------------------- batches

#: Images are ``[0, 1]``; resampling may overshoot by float rounding only.
BATCH_RANGE_TOLERANCE = 1e-3


def _at(batch: Mapping, key: str, index: int) -> Any:
    values = batch.get(key)
    return values[index] if isinstance(values, (list, tuple)) and index < len(values) else None


def batch_range_problem(batch: Mapping, where: str) -> str | None:
    """One line naming the first sample of ``batch`` (``input_image`` / ``target_image`` ``(B, 3, H, W)``)
    whose input or target is outside ``[0, 1]`` or not finite, with ``where`` (e.g. ``"validation
    batch 3"``), its id and file when the batch carries them; ``None`` when the batch is good."""
    images = [(role, batch.get(key)) for role, key in (("input", "input_image"), ("target", "target_image"))]
    images = [(role, x) for role, x in images if hasattr(x, "shape") and len(x.shape) == 4]
    tol = BATCH_RANGE_TOLERANCE
    if all(bool(x.isfinite().all()) and float(x.amin()) >= -tol and float(x.amax()) <= 1 + tol for _, x in images):
        return None
    for index in range(int(images[0][1].shape[0])):
        for role, x in images:
            sample = x[index]
            finite = bool(sample.isfinite().all())
            low, high = float(sample.nan_to_num(0.5).amin()), float(sample.nan_to_num(0.5).amax())
            if finite and low >= -tol and high <= 1 + tol:
                continue
            name = _at(batch, "image_id", index)
            path = _at(batch, f"{role}_path", index)
            who = ", ".join(str(v) for v in (name, path) if v is not None)
            what = ("holds non-finite values (NaN or inf)" if not finite else
                    f"values in [{low:.4g}, {high:.4g}], expected [0, 1]"
                    + (" (images in 0-255? divide by 255)" if high > 1.5 else ""))
            return f"{where}, sample {index}{f' ({who})' if who else ''}: {role} {what}"
    return None


def check_batch_range(batch: Mapping, where: str) -> None:
    """Raise :class:`~autohdr.data.pairs.DataError` with :func:`batch_range_problem`'s line, if any."""
    problem = batch_range_problem(batch, where)
    if problem:
        raise DataError(problem)


# ----------------------------------------------------------------------------- dataset and loader

class PairDataset:
    """Distorted/corrected pairs from a table with ``image_id, input_path, target_path``.

    A map-style dataset (``__len__`` and ``__getitem__``, all ``DataLoader`` and samplers need); it
    does not subclass ``torch.utils.data.Dataset`` so that this module imports without torch.

    ``__getitem__`` returns ``input_image`` and ``target_image`` ``(3, H, W)`` float32 in ``[0, 1]``
    plus ``image_id``, ``input_path`` and ``target_path`` (str). With ``resize_hw`` both images are
    resized to ``(H, W)``; input and target must have the same upright size either way (the EXIF
    orientation of each is applied on load).

    ``hflip`` (training only -- keep it off for validation) flips input and target together,
    horizontally, for about half the samples; the choice is a function of ``(seed, epoch, index)``
    only, so it is the same in every worker process. Call :meth:`set_epoch` to draw new flips per
    epoch (with persistent workers, only before the workers start).

    ``decoded`` (a :class:`DecodedImages`) keeps decoded images in memory across epochs; flips are
    applied after it, so they still change per epoch.
    """

    def __init__(self, rows: pd.DataFrame, resize_hw: tuple[int, int] | None = None, hflip: bool = False,
                 seed: int = 0, *, draft: bool = True, decoded: DecodedImages | None = None) -> None:
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
        self.decoded = decoded
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
        decode = self.decoded.decode if self.decoded is not None else _decode
        inp, inp_size = decode(self.input_paths[index], self.resize_hw, self.draft, MIN_IMAGE_SIDE)
        tgt, tgt_size = decode(self.target_paths[index], self.resize_hw, self.draft, MIN_IMAGE_SIDE)
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
