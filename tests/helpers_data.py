"""Small builders of good and bad data files for the data tests (all write under a given tmp folder)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def gradient_rgb(height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 image with an asymmetric gradient plus noise (so flips are visible)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) / (height + width)], -1)
    noisy = base * 200 + rng.integers(0, 40, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def write_pair(folder: Path, image_id: str, *, size=(32, 48), target_size=None, ext: str = ".jpg",
               seed: int = 0) -> tuple[Path, Path]:
    """Write ``<id>_original<ext>`` and ``<id>_generated<ext>``; ``size`` and ``target_size`` are ``(H, W)``."""
    h, w = size
    th, tw = target_size or size
    inp = save(gradient_rgb(h, w, seed), folder / f"{image_id}_original{ext}")
    tgt = save(gradient_rgb(th, tw, seed + 1), folder / f"{image_id}_generated{ext}")
    return inp, tgt


def copy_pairs(src_root: Path, dst: Path, count: int) -> Path:
    """Copy the first ``count`` pairs (by id) of ``src_root`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for original in sorted(src_root.glob("*_original.*"))[:count]:
        image_id = original.name.rsplit("_original", 1)[0]
        shutil.copy2(original, dst / original.name)
        for target in src_root.glob(f"{image_id}_generated.*"):
            shutil.copy2(target, dst / target.name)
    return dst


def truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    """Write the first ``keep`` fraction of ``src``'s bytes to ``dst``."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (the scripts folder is not a package)."""
    path = REPO_ROOT / "scripts" / f"{name}.py"
    module_name = f"_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
