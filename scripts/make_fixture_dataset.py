"""Generate the embedded fixture dataset: distorted/corrected photo pairs with known lens parameters.

    python scripts/make_fixture_dataset.py --out fixtures --seed 0 [--pairs 72] [--size 256]

Writes ``OUT/pairs/<id>_original.jpg`` (the distorted INPUT), ``OUT/pairs/<id>_generated.jpg``
(the corrected TARGET, a clean crop of a scikit-image sample photo), ``OUT/ground_truth.csv`` and
``OUT/README.md``.

Convention (that of :mod:`autohdr.lens.geometry`): the correction parameters ``P`` define the backward
grid ``brown_conrady_grid(P)`` (plus an optional smooth residual ``R``) that maps every pixel of
the corrected image to where it is sampled in the distorted input. The input is made with the
inverse grid, ``input = warp(clean, invert_brown_conrady_grid(P, residual_fn=R))``, so that
``warp(input, brown_conrady_grid(P) + R) ~= clean`` wherever that grid stays inside the frame.

Everything is computed in float64 from ``numpy.random.default_rng([seed, pair_index])``, so the same
seed gives byte-identical files and the first N pairs do not depend on ``--pairs``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

try:
    import autohdr  # noqa: F401
except ImportError:  # run as `python scripts/make_fixture_dataset.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autohdr.lens.geometry import (PARAM_NAMES, brown_conrady_grid, brown_conrady_map, folded_fraction,
                              grid_to_pixels, identity_grid, invert_brown_conrady_grid, warp)

GT_COLUMNS: tuple[str, ...] = ("image_id", *PARAM_NAMES, "residual_max_px", "source")
JPEG_QUALITY = 90
INPUT_SUFFIX, TARGET_SUFFIX = "_original", "_generated"

#: Sampling ranges of the correction parameters (all inside the model's default bounds).
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "k1": (0.12, 0.35), "k2": (-0.05, 0.08), "k3": (-0.02, 0.02),
    "p1": (-0.01, 0.01), "p2": (-0.01, 0.01),
    "dcx": (-0.03, 0.03), "dcy": (-0.03, 0.03), "s": (0.95, 1.05),
}
RESIDUAL_FRACTION = 1.0 / 3.0          # share of pairs with a residual field beyond the parametric model
RESIDUAL_MAX_PX = (2.0, 5.0)           # its maximum displacement, in pixels at 256 px (scaled with --size)


def _motorcycle(side: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data
        return data.stereo_motorcycle()[side]
    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data
        return getattr(data, name)()
    return load


#: Source photos (all shipped inside scikit-image, no network) and how many pairs each gives per 72.
#: Scenes with straight lines (brick, page, text, rocket, camera, motorcycle, coffee) dominate.
SOURCES: dict[str, tuple[Callable[[], np.ndarray], int]] = {
    "brick": (_skimage("brick"), 7),
    "rocket": (_skimage("rocket"), 7),
    "page": (_skimage("page"), 6),
    "camera": (_skimage("camera"), 6),
    "coffee": (_skimage("coffee"), 6),
    "motorcycle_left": (_motorcycle(0), 6),
    "text": (_skimage("text"), 5),
    "astronaut": (_skimage("astronaut"), 5),
    "motorcycle_right": (_motorcycle(1), 4),
    "chelsea": (_skimage("chelsea"), 4),
    "coins": (_skimage("coins"), 3),
    "checkerboard": (_skimage("checkerboard"), 2),
    "grass": (_skimage("grass"), 2),
    "gravel": (_skimage("gravel"), 2),
    "immunohistochemistry": (_skimage("immunohistochemistry"), 2),
    "moon": (_skimage("moon"), 2),
    "retina": (_skimage("retina"), 1),
    "hubble_deep_field": (_skimage("hubble_deep_field"), 1),
    "clock": (_skimage("clock"), 1),
}


@dataclass(frozen=True)
class Pair:
    """One generated pair; images are ``(3, H, W)`` float64 in ``[0, 1]``."""

    image_id: str
    source: str
    params: np.ndarray          # (8,) in PARAM_NAMES order
    residual_max_px: float
    clean: torch.Tensor
    distorted: torch.Tensor
    correction_grid: torch.Tensor   # (1, H, W, 2): brown_conrady_grid(P) + R


def source_schedule(seed: int) -> list[str]:
    """The seeded order in which sources are used (pair ``i`` uses entry ``i % len``)."""
    names = [name for name, (_, count) in SOURCES.items() for _ in range(count)]
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(names))
    return [names[i] for i in order]


_SOURCE_CACHE: dict[str, np.ndarray] = {}


def load_source(name: str) -> np.ndarray:
    """Source photo as ``(H, W, 3)`` float64 in ``[0, 1]`` (gray stacked to RGB, alpha dropped)."""
    if name not in _SOURCE_CACHE:
        from skimage.util import img_as_float64
        img = img_as_float64(SOURCES[name][0]())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        _SOURCE_CACHE[name] = np.ascontiguousarray(img[..., :3])
    return _SOURCE_CACHE[name]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (55-100 % of the short side, 85-100 % for small photos) resized to ``size``."""
    from skimage.transform import resize
    h, w = image.shape[:2]
    short = min(h, w)
    lo = 0.85 if short < 1.5 * size else 0.55
    side = max(16, int(round(rng.uniform(lo, 1.0) * short)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = image[top:top + side, left:left + side]
    out = resize(crop, (size, size), order=1, anti_aliasing=side > size, mode="reflect")
    return np.clip(out, 0.0, 1.0)


def sample_params(rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(*PARAM_RANGES[name]) for name in PARAM_NAMES], dtype=np.float64)


def make_residual_fn(rng: np.random.Generator, size: int):
    """A smooth field of 2-3 Gaussian bumps, normalized units, scaled to a max of 2-5 px at 256 px.

    Returns ``(fn, max_px)`` where ``fn(points (B, H, W, 2)) -> (B, H, W, 2)`` and ``max_px`` is
    the largest displacement in pixels over the ``size x size`` output grid.
    """
    n = int(rng.integers(2, 4))
    centers = torch.tensor(rng.uniform(-0.7, 0.7, size=(n, 2)), dtype=torch.float64)
    sigmas = torch.tensor(rng.uniform(0.2, 0.45, size=n), dtype=torch.float64)
    amps = torch.tensor(rng.normal(size=(n, 2)), dtype=torch.float64)

    def raw(points: torch.Tensor) -> torch.Tensor:
        d2 = ((points.unsqueeze(-2) - centers.to(points)) ** 2).sum(-1)       # (..., n)
        weights = torch.exp(-d2 / (2.0 * sigmas.to(points) ** 2))
        return weights @ amps.to(points)                                       # (..., 2)

    ident = identity_grid(1, size, size, dtype=torch.float64)
    raw_max = grid_to_pixels(raw(ident)).norm(dim=-1).max().item()
    target_px = rng.uniform(*RESIDUAL_MAX_PX) * size / 256.0
    scale = target_px / raw_max

    def residual_fn(points: torch.Tensor) -> torch.Tensor:
        return raw(points) * scale

    max_px = grid_to_pixels(residual_fn(ident)).norm(dim=-1).max().item()
    return residual_fn, max_px


def make_pair(index: int, seed: int, size: int, schedule: list[str]) -> Pair:
    """Generate pair ``index`` from ``default_rng([seed, index])`` alone."""
    rng = np.random.default_rng([seed, index])
    source = schedule[index % len(schedule)]
    clean_np = random_crop(load_source(source), size, rng)
    clean = torch.from_numpy(clean_np).permute(2, 0, 1).unsqueeze(0).contiguous()   # (1, 3, H, W)
    with_residual = rng.uniform() < RESIDUAL_FRACTION
    ident = identity_grid(1, size, size, dtype=torch.float64)
    for _ in range(100):
        params_np = sample_params(rng)
        residual_fn, residual_max_px = make_residual_fn(rng, size) if with_residual else (None, 0.0)
        params = torch.from_numpy(params_np).unsqueeze(0)
        grid = brown_conrady_grid(params, size, size)
        if residual_fn is not None:
            grid = grid + residual_fn(ident)
        if folded_fraction(grid).item() > 0:
            continue
        inverse = invert_brown_conrady_grid(params, size, size, residual_fn=residual_fn)
        mapped = brown_conrady_map(params, inverse) + (residual_fn(inverse) if residual_fn else 0.0)
        if grid_to_pixels(mapped - ident).abs().max().item() > 0.01 or folded_fraction(inverse).item() > 0:
            continue
        distorted = warp(clean, inverse)
        return Pair(f"p{index:03d}", source, params_np, residual_max_px, clean[0], distorted[0], grid)
    raise RuntimeError(f"pair {index}: no non-folding parameters found in 100 draws")


def valid_mask(grid: torch.Tensor, margin_px: float = 1.0) -> torch.Tensor:
    """``(H, W)`` bool: where the ``(1, H, W, 2)`` grid samples at least ``margin_px`` inside the frame."""
    _, h, w, _ = grid.shape
    lim = grid.new_tensor([1.0 - 2.0 * margin_px / (w - 1), 1.0 - 2.0 * margin_px / (h - 1)])
    return (grid[0].abs() <= lim).all(dim=-1)


def masked_mae(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute difference of ``(3, H, W)`` images over the ``(H, W)`` mask."""
    return (a - b).abs()[:, mask].mean().item()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in ``[0, 1]`` -> ``(H, W, 3)`` uint8."""
    arr = image.permute(1, 2, 0).numpy()
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_jpeg(image: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_uint8(image)).save(path, format="JPEG", quality=JPEG_QUALITY,
                                                     subsampling=2, optimize=False)


def read_jpeg(path: Path) -> torch.Tensor:
    """A stored JPEG as ``(3, H, W)`` float64 in ``[0, 1]`` (for the self-check)."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


README = """# Fixture dataset

{pairs} synthetic lens-distortion pairs at {size}x{size}, generated by

    python scripts/make_fixture_dataset.py --out fixtures --seed {seed} --pairs {pairs} --size {size}

(deterministic: the same seed gives byte-identical files; pair `i` depends only on the seed and `i`).

## Layout (the challenge layout)

* `pairs/<id>_original.jpg` -- the distorted INPUT photo.
* `pairs/<id>_generated.jpg` -- the corrected TARGET photo.
* `ground_truth.csv` -- the correction parameters of every pair.

Ids are `p000`, `p001`, ... JPEG quality {quality}, 4:2:0 chroma subsampling.

## How a pair is made

1. A random square crop of a photo shipped inside scikit-image (`skimage.data`; no network),
   resized to {size}x{size} (gray photos are stacked to RGB). Scenes with straight lines (brick,
   rocket, page, camera, coffee, motorcycle, text) make up most pairs. The clean crop is the TARGET.
2. Correction parameters `P = [k1, k2, k3, p1, p2, dcx, dcy, s]` (the convention of
   `autohdr.lens.geometry`: normalized, `align_corners=True`, backward grid from corrected pixel to
   distorted input) drawn uniformly from
{ranges}
   Draws whose correction grid folds are rejected. `k1 > 0` for every pair: the correction grid samples
   beyond the input frame near the corners, so a corrected image is black there (only {valid_min:.0%} to
   {valid_max:.0%} of the corrected frame, mean {valid_mean:.0%}, lies inside the input), and the input shows
   the matching pincushion-like curvature (straight lines bow towards the centre).
3. About a third of the pairs also carry a smooth residual `R` beyond the parametric model (2-3 Gaussian
   bumps, maximum displacement {rmin:g}-{rmax:g} px at 256 px): the correction mapping is
   `brown_conrady_map(P, x) + R(x)`.
4. INPUT = `warp(clean, invert_brown_conrady_grid(P, H, W, residual_fn=R))` (float64), so that
   `warp(input, brown_conrady_grid(P, H, W) + R) ~= target` wherever that grid stays inside the frame.

## ground_truth.csv columns

`image_id, k1, k2, k3, p1, p2, dcx, dcy, s, residual_max_px, source`

* `k1 .. s`: the correction parameters `P` above (the float64 values used, written to 10 significant digits).
* `residual_max_px`: 0 for purely parametric pairs, else the maximum |R| in pixels at {size}x{size}
  (the parametric parameters alone then do not fully correct the pair).
* `source`: the scikit-image photo the crop was taken from.
"""


def generate(out: Path, seed: int = 0, pairs: int = 72, size: int = 256, *,
             check: int = 4, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Write the dataset under ``out`` and return the ground-truth table.

    ``check`` pairs (the first ones) have their correction verified after the JPEG round trip; every
    pair is verified in float64 before saving.
    """
    if pairs < 1 or size < 32:
        raise ValueError(f"need pairs >= 1 and size >= 32, got pairs={pairs}, size={size}")
    out = Path(out)
    pair_dir = out / "pairs"
    pair_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(pair_dir.glob(f"*{INPUT_SUFFIX}.*")) + list(pair_dir.glob(f"*{TARGET_SUFFIX}.*")):
        stale.unlink()
    schedule = source_schedule(seed)
    rows, float_errors, valid_fracs = [], [], []
    for index in range(pairs):
        pair = make_pair(index, seed, size, schedule)
        mask = valid_mask(pair.correction_grid)
        valid_fracs.append(mask.double().mean().item())
        corrected = warp(pair.distorted.unsqueeze(0), pair.correction_grid)[0]
        err_corrected = masked_mae(corrected, pair.clean, mask)
        err_identity = masked_mae(pair.distorted, pair.clean, mask)
        float_errors.append(err_corrected)
        if err_corrected > 0.5 * err_identity:
            raise RuntimeError(f"{pair.image_id}: correction does not undo the distortion "
                               f"({err_corrected:.4f} vs identity {err_identity:.4f})")
        input_path = pair_dir / f"{pair.image_id}{INPUT_SUFFIX}.jpg"
        target_path = pair_dir / f"{pair.image_id}{TARGET_SUFFIX}.jpg"
        save_jpeg(pair.distorted, input_path)
        save_jpeg(pair.clean, target_path)
        if index < check:
            stored_in, stored_tgt = read_jpeg(input_path), read_jpeg(target_path)
            jpeg_corrected = warp(stored_in.unsqueeze(0), pair.correction_grid)[0]
            log(f"{pair.image_id} ({pair.source:>20s}, residual {pair.residual_max_px:4.2f} px, "
                f"valid {mask.double().mean().item():5.1%}): mean |error| inside the valid area: "
                f"float64 corrected {err_corrected:.4f}, JPEG corrected {masked_mae(jpeg_corrected, stored_tgt, mask):.4f}, "
                f"uncorrected {masked_mae(stored_in, stored_tgt, mask):.4f}")
        rows.append({"image_id": pair.image_id, **dict(zip(PARAM_NAMES, pair.params.tolist())),
                     "residual_max_px": pair.residual_max_px, "source": pair.source})
    table = pd.DataFrame(rows, columns=list(GT_COLUMNS))
    table.to_csv(out / "ground_truth.csv", index=False, float_format="%.10g")
    ranges = "\n".join(f"   * `{name}` in [{lo:g}, {hi:g}]" for name, (lo, hi) in PARAM_RANGES.items())
    (out / "README.md").write_text(README.format(pairs=pairs, size=size, seed=seed, quality=JPEG_QUALITY,
                                                 ranges=ranges, rmin=RESIDUAL_MAX_PX[0], rmax=RESIDUAL_MAX_PX[1],
                                                 valid_min=min(valid_fracs), valid_max=max(valid_fracs),
                                                 valid_mean=float(np.mean(valid_fracs))),
                                   encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {pairs} pairs ({int((table.residual_max_px > 0).sum())} with a residual) to {out}, "
        f"{total / 1e6:.2f} MB; float64 corrected error inside the valid area: "
        f"mean {np.mean(float_errors):.4f}, max {np.max(float_errors):.4f}")
    return table


def tree_digest(root: Path) -> str:
    """SHA-256 over relative paths and bytes of every file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (pairs/ and ground_truth.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=72)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--check", type=int, default=4, help="pairs verified after the JPEG round trip")
    args = parser.parse_args(argv)
    try:
        generate(args.out, args.seed, args.pairs, args.size, check=args.check)
    except ValueError as exc:
        print(f"make_fixture_dataset: error: {exc}", file=sys.stderr)
        return 2
    print(f"tree sha256: {tree_digest(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
