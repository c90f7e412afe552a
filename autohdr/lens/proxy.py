"""Non-differentiable proxy of the challenge score for lens-distortion correction.

Runs on the host (numpy, scikit-image, scipy.ndimage) on one ``(pred, target)`` pair at a time;
the trainer calls :func:`proxy_score_batch` on validation batches. It is a *proxy*: the weights are
the challenge's split (edges 40%, lines 22%, gradient orientation 18%, SSIM 15%, pixels 5%), the
sub-scores are our own stand-ins for its measures, and it is not differentiable.

Convention (see :mod:`autohdr.lens.geometry`): a single image is a torch tensor ``(3, H, W)`` or a numpy
array ``(H, W, 3)``, float in ``[0, 1]``; a batch is ``(B, 3, H, W)`` (torch) or ``(B, H, W, 3)``
(numpy). Every input is quantised to float32 first (torch via ``.detach().cpu().float()``), so a
torch tensor and the numpy array holding the same values score identically. The luminance
``Y = 0.299 R + 0.587 G + 0.114 B`` (BT.601, as in :mod:`autohdr.lens.losses`) feeds every structural
sub-score.

Edge maps: Canny (``skimage.feature.canny``) of the luminance with ``sigma = CANNY_SIGMA`` and
fixed absolute hysteresis thresholds (so a flat image has no edges), with the band of
``edge_margin(H, W)`` pixels along the frame (``EDGE_MARGIN_FRACTION`` of the side, at least 2)
cleared; ``grad`` ignores the same band. Any zoom-out or barrel warp samples outside the input
there and leaves a thin black rim whose straight, frame-parallel edge would otherwise dominate the
edge and line scores of near-correct predictions; black areas are still charged by ``ssim``,
``mae`` and, when they are large, the border hard fail.

Sub-scores, each in ``[0, 1]`` and exactly 1 for ``pred == target``:

* ``edge`` (weight 0.40) -- edge F1 of the edge maps ``E_p``, ``E_t`` with a one-pixel tolerance
  (8-neighbourhood, i.e. distance <= sqrt(2)): ``precision = |E_p within tol of E_t| / |E_p|``,
  ``recall = |E_t within tol of E_p| / |E_t|``, ``edge = 2 P R / (P + R)``. Two edge-free images
  give 1, exactly one edge-free image gives 0. Why: the challenge weighs edge agreement most; a
  warp that leaves edges displaced by more than a pixel loses recall, one that creates edges (the
  rim of a black out-of-frame region, noise) loses precision.
* ``line`` (weight 0.22) -- straight-line similarity in Hough space. ``A = hough_line(E)`` counts,
  for every line ``(rho, theta)`` (one-pixel ``rho`` bins, ``HOUGH_ANGLES`` angle bins over
  ``[-pi/2, pi/2)``), the edge pixels on it. Its straight-line evidence is the high-pass
  ``L = max(A - box_mean(A), 0)`` with a ``LINE_BACKGROUND`` window (31 pixels x 30 degrees): a
  straight line is a sharp peak and survives, while a curved line spreads its votes over a broad
  ridge of neighbouring ``(rho, theta)`` cells, as does texture, and is removed.
  ``line = clip(corr(L_p, L_t), 0, 1)``, the Pearson correlation of the two evidence maps, so the
  longest lines (squared votes) dominate. Residual radial distortion bends the target's straight
  lines (their peaks flatten) and moves them (their peaks shift), and both lower the correlation;
  it is 1 for identical edge maps, 1 when neither image has any line evidence and 0 when exactly
  one has. Measured at 128x128 on scikit-image's photographs it falls steadily with ``|k1|``
  (about 0.5 at ``k1 = 0.1``, 0.4 at 0.3); unrelated photographs score about 0.2.
* ``grad`` (weight 0.18) -- gradient-orientation agreement. Sobel gradients ``g_p``, ``g_t`` of the
  luminances; ``c = cos(2 (angle(g_p) - angle(g_t)))`` computed from dot and cross products (no
  ``atan2``), so it ignores edge polarity (orientation modulo pi) and is 1 for parallel, -1 for
  perpendicular gradients. Weighted by ``w = (|g_p| + |g_t|) / 2`` (where one gradient vanishes,
  ``c = 0``: no agreement, and the other's magnitude still counts),
  ``grad = clip(sum w c / sum w, 0, 1)``; two flat images give 1. Why: straight structures keep
  their direction only under a correct warp; random orientations average to 0.
* ``ssim`` (weight 0.15) -- ``skimage.metrics.structural_similarity`` of the luminances
  (``data_range = 1``, 7x7 uniform window), clipped to ``[0, 1]``; computed here by the same
  operations (bit-identical), so a target's window statistics are reused. Why: local structure and
  contrast, the challenge's perceptual term.
* ``mae`` (weight 0.05) -- pixel accuracy ``clip(1 - mean |pred - target|, 0, 1)`` over all three
  channels, unscaled (an MAE of 0.1 gives 0.9). Why: a small absolute-intensity term.

``hard_fail`` (a python bool) marks a catastrophic prediction; the thresholds are in
:class:`HardFailThresholds`. It is True when any of:

* *blank*: the pred's luminance std is below ``blank_std`` while the target's is not (a constant,
  black or washed-out output);
* *border damage*: in the border band (the pixels within ``border_fraction`` of the side from any
  edge; 0.25 is the outer ring holding 75% of the frame), more than ``border_damage`` of the
  pixels where the target has content (max channel > ``black_level``) are black in the pred. A
  plain barrel warp with ``k1 = 0.3`` blackens about 49% of that band at 128x128, ``k1 = 0.6``
  about 66%; a black frame a quarter of the side thick blackens all of it;
* *collapsed edges*: the target has edges (Canny density >= ``min_target_edge_density``) and the
  pred's edge density is below ``edge_collapse`` times the target's (blurred or erased output).

When ``hard_fail`` is True, ``total`` is 0.0 (the challenge scores such outputs as failures); the
sub-scores are still reported as computed. Otherwise ``total = sum_k w_k s_k / sum_k w_k`` over the
five sub-scores with :class:`ProxyWeights`.

Targets are cached: everything computed from the target alone (its luminance, edges, gradients,
straight-line evidence and SSIM window statistics) is kept in a bounded LRU keyed by a digest of
its float32 values, so a validation set scored every epoch, and against several baselines, computes
each target's features once per process. The scores are bit-identical with and without the cache
(the same operations on the same arrays; ``tests/test_proxy.py`` checks it against the uncached
definition); :func:`clear_target_cache` empties it, ``TARGET_CACHE_MAX_BYTES`` bounds it.

Speed: about 6 ms per pair at 128x128 on one CPU core (two Canny detectors, two Hough transforms,
one SSIM, all float64), about 3.5 ms when the target is cached, measured with ``time.perf_counter``
over 200 calls after a warm-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.feature import canny
from skimage.transform import hough_line

SCORE_KEYS: tuple[str, ...] = ("total", "edge", "line", "grad", "ssim", "mae", "hard_fail")
SUB_SCORES: tuple[str, ...] = ("edge", "line", "grad", "ssim", "mae")

# BT.601 luma weights, the same as autohdr.lens.losses uses.
LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)
MIN_SIDE = 16                    # smallest H and W accepted (Canny, 7x7 SSIM window, border band)
RANGE_TOLERANCE = 1e-3           # values in [-tol, 1 + tol] are clipped to [0, 1], beyond is an error
CANNY_SIGMA = 1.5                # Gaussian sigma of the Canny detector, in pixels
CANNY_LOW, CANNY_HIGH = 0.1, 0.2  # absolute hysteresis thresholds on skimage's Sobel magnitude
EDGE_MARGIN_FRACTION = 0.03      # edges this close to the frame (fraction of the side, >= 2 px) are dropped
HOUGH_ANGLES = 90                # Hough angle bins over [-pi/2, pi/2): two degrees each
LINE_BACKGROUND = (31, 15)       # Hough background window: 31 rho bins (pixels) x 15 angle bins (30 degrees)

SSIM_WINDOW = 7                  # SSIM's uniform window (scikit-image's default), in pixels
SSIM_K1, SSIM_K2 = 0.01, 0.03    # SSIM stabilisers (scikit-image's defaults), data range 1
TARGET_CACHE_MAX_BYTES = 256 * 2**20  # bound of the target-feature cache (about 1.5 MB a 128x128 target)

_THETAS = np.linspace(-np.pi / 2, np.pi / 2, HOUGH_ANGLES, endpoint=False)


@dataclass(frozen=True)
class ProxyWeights:
    """Weight of each sub-score in ``total``; normalised by their sum (see :meth:`normalized`)."""

    edge: float = 0.40  # Canny edge F1 with a one-pixel tolerance
    line: float = 0.22  # correlation of high-passed Hough accumulators (straight lines)
    grad: float = 0.18  # magnitude-weighted cos(2 * gradient angle difference)
    ssim: float = 0.15  # SSIM of the luminances
    mae: float = 0.05   # 1 - mean absolute error

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"proxy weight {f.name!r} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"proxy weight {f.name!r} must be finite and >= 0, got {value}")
        total = sum(getattr(self, name) for name in SUB_SCORES)
        if total <= 0:
            raise ValueError(f"proxy weights must have a positive sum, got {total}")

    def normalized(self) -> dict[str, float]:
        """The weights divided by their sum, keyed by sub-score name (they sum to 1)."""
        total = sum(getattr(self, name) for name in SUB_SCORES)
        return {name: getattr(self, name) / total for name in SUB_SCORES}


@dataclass(frozen=True)
class HardFailThresholds:
    """When a prediction counts as a catastrophic failure (``hard_fail``, ``total = 0``)."""

    blank_std: float = 0.01                 # pred luminance std below this: blank / near-constant
    black_level: float = 0.02               # a pixel whose max channel is <= this is black
    border_fraction: float = 0.25           # border band: pixels within this fraction of a side
    border_damage: float = 0.75             # hard fail above this black fraction of the band's content
    edge_collapse: float = 0.2              # hard fail below this ratio of pred / target edge density
    min_target_edge_density: float = 0.002  # edge collapse is judged only when the target has edges

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"hard-fail threshold {f.name!r} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"hard-fail threshold {f.name!r} must be >= 0, got {value}")
        if not 0 < self.border_fraction <= 0.5:
            raise ValueError(f"border_fraction must be in (0, 0.5], got {self.border_fraction}")


# ----------------------------------------------------------------------------- input checks

def _to_hwc(image, name: str) -> np.ndarray:
    """One image, torch ``(3, H, W)`` or numpy ``(H, W, 3)`` float in ``[0, 1]`` -> float64 ``(H, W, 3)``."""
    return _to_float64(_checked_float32(image, name))


def _to_float64(array: np.ndarray) -> np.ndarray:
    """A checked float32 ``(H, W, 3)`` array -> float64 clipped to ``[0, 1]``."""
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _checked_float32(image, name: str) -> np.ndarray:
    """One image, torch ``(3, H, W)`` or numpy ``(H, W, 3)``, checked -> float32 ``(H, W, 3)`` (may be a view)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{name} must be a torch tensor of shape (3, H, W) (use proxy_score_batch for "
                             f"(B, 3, H, W)), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {image.dtype}")
        array = image.detach().cpu().float().permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name} must be a numpy array of shape (H, W, 3), got {image.shape}")
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"{name} must be a floating-point array in [0, 1], got dtype {image.dtype}")
        array = image.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{name} must be a torch.Tensor (3, H, W) or numpy.ndarray (H, W, 3), "
                         f"got {type(image).__name__}")
    height, width = array.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"{name} must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {height}x{width}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must have finite values only, got {int((~np.isfinite(array)).sum())} "
                         "NaN/inf values")
    lo, hi = float(array.min()), float(array.max())
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(f"{name} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return array


# ----------------------------------------------------------------------------- features

@dataclass(frozen=True)
class _Features:
    """What every sub-score needs from one image; all arrays ``(H, W)`` unless noted."""

    image: np.ndarray    # (H, W, 3) float64 in [0, 1]
    gray: np.ndarray     # luminance
    peak: np.ndarray     # max over the three channels (black detection)
    edges: np.ndarray    # bool Canny map with the edge_margin band cleared
    gx: np.ndarray       # Sobel d/dx of the luminance, (H - 2 m, W - 2 m) without the margin m
    gy: np.ndarray       # Sobel d/dy, same crop


def edge_margin(height: int, width: int) -> int:
    """Width in pixels of the frame band where edges are ignored: ``EDGE_MARGIN_FRACTION`` of the side, >= 2."""
    return max(2, int(round(EDGE_MARGIN_FRACTION * min(height, width))))


def _features(image: np.ndarray) -> _Features:
    """Luminance, channel maximum, Canny edges and Sobel gradients of an ``(H, W, 3)`` image."""
    gray = image @ np.asarray(LUMA)
    edges = canny(gray, sigma=CANNY_SIGMA, low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH, mode="nearest")
    margin = edge_margin(*gray.shape)
    edges[:margin], edges[-margin:], edges[:, :margin], edges[:, -margin:] = False, False, False, False
    inner = (slice(margin, -margin), slice(margin, -margin))
    gx = ndi.sobel(gray, axis=1, mode="nearest")[inner]
    gy = ndi.sobel(gray, axis=0, mode="nearest")[inner]
    return _Features(image, gray, image.max(axis=-1), edges, gx, gy)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall <= 0 else 2.0 * precision * recall / (precision + recall)


def _dilate_3x3(mask: np.ndarray) -> np.ndarray:
    """Binary dilation of an ``(H, W)`` mask by the 3x3 square (the 8-neighbourhood), by shifts."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def edge_f1(edges_p: np.ndarray, edges_t: np.ndarray) -> float:
    """F1 of two boolean ``(H, W)`` edge maps with a one-pixel (8-neighbour) tolerance."""
    n_p, n_t = int(edges_p.sum()), int(edges_t.sum())
    if n_p == 0 and n_t == 0:
        return 1.0
    if n_p == 0 or n_t == 0:
        return 0.0
    near_t, near_p = _dilate_3x3(edges_t), _dilate_3x3(edges_p)
    precision = float((edges_p & near_t).sum()) / n_p
    recall = float((edges_t & near_p).sum()) / n_t
    return _f1(precision, recall)


def _straight_line_evidence(edges: np.ndarray) -> np.ndarray:
    """High-passed Hough accumulator ``(n_rho, HOUGH_ANGLES)`` of a boolean ``(H, W)`` edge map.

    ``max(A - uniform_filter(A, LINE_BACKGROUND), 0)``: the votes a line gets above the mean of the
    lines around it (``LINE_BACKGROUND`` = rho bins x angle bins). A straight line is a sharp peak
    and survives; a curved line (or texture) spreads its votes over a broad ridge and is removed.
    """
    accumulator, _, _ = hough_line(edges, theta=_THETAS)
    accumulator = accumulator.astype(np.float64)
    background = ndi.uniform_filter(accumulator, size=LINE_BACKGROUND, mode="nearest")
    return np.maximum(accumulator - background, 0.0)


def _centred_line_evidence(edges: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`_straight_line_evidence` minus its mean ``(n_rho, HOUGH_ANGLES)``, and its L2 norm."""
    lines = _straight_line_evidence(edges)
    lines -= lines.mean()
    return lines, float(np.sqrt((lines * lines).sum()))


def _line_correlation(lines_p: np.ndarray, norm_p: float, lines_t: np.ndarray, norm_t: float) -> float:
    """``clip(corr, 0, 1)`` of two centred evidence maps (1 when neither has a line, 0 when one has)."""
    if norm_p <= 1e-12 and norm_t <= 1e-12:
        return 1.0
    if norm_p <= 1e-12 or norm_t <= 1e-12:
        return 0.0
    return float(np.clip((lines_p * lines_t).sum() / (norm_p * norm_t), 0.0, 1.0))


def line_straightness(edges_p: np.ndarray, edges_t: np.ndarray) -> float:
    """Straight-line similarity of two boolean ``(H, W)`` edge maps, in ``[0, 1]``.

    ``clip(corr(L_p, L_t), 0, 1)``: the centred cosine (Pearson correlation) between the two
    images' :func:`_straight_line_evidence`; 1 for identical maps, 1 when neither has a straight
    line, 0 when exactly one has.
    """
    return _line_correlation(*_centred_line_evidence(edges_p), *_centred_line_evidence(edges_t))


def _ssim_window_stats(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-window mean of ``gray`` ``(H, W)`` and of its square (SSIM's per-image statistics)."""
    return (ndi.uniform_filter(gray, size=SSIM_WINDOW), ndi.uniform_filter(gray * gray, size=SSIM_WINDOW))


def _ssim(gray_p: np.ndarray, stats_p, gray_t: np.ndarray, stats_t) -> float:
    """Mean SSIM of two luminances ``(H, W)``, data range 1, 7x7 uniform window, sample covariance.

    The same operations in the same order as ``skimage.metrics.structural_similarity(gray_p,
    gray_t, data_range=1.0)`` (scikit-image 0.2x), so the result is bit-identical to it; each
    image's window statistics (:func:`_ssim_window_stats`) are passed in, so a target's are
    computed once.
    """
    ux, uxx = stats_p
    uy, uyy = stats_t
    uxy = ndi.uniform_filter(gray_p * gray_t, size=SSIM_WINDOW)
    n_window = SSIM_WINDOW ** 2
    cov_norm = n_window / (n_window - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    a1, a2, b1, b2 = 2 * ux * uy + c1, 2 * vxy + c2, ux ** 2 + uy ** 2 + c1, vx + vy + c2
    s = (a1 * a2) / (b1 * b2)
    pad = (SSIM_WINDOW - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean(dtype=np.float64))


def gradient_orientation(gx_p: np.ndarray, gy_p: np.ndarray, gx_t: np.ndarray, gy_t: np.ndarray) -> float:
    """Magnitude-weighted ``cos(2 * angle difference)`` of two gradient fields ``(H, W)``, in ``[0, 1]``."""
    return _gradient_orientation(gx_p, gy_p, np.hypot(gx_p, gy_p), gx_t, gy_t, np.hypot(gx_t, gy_t))


def _gradient_orientation(gx_p, gy_p, mag_p, gx_t, gy_t, mag_t) -> float:
    """:func:`gradient_orientation` with each field's magnitude ``hypot(gx, gy)`` given."""
    weight = 0.5 * (mag_p + mag_t)
    weight_sum = float(weight.sum())
    if weight_sum <= 1e-12:
        return 1.0
    dot = gx_p * gx_t + gy_p * gy_t
    cross = gx_p * gy_t - gy_p * gx_t
    norm2 = (mag_p * mag_t) ** 2
    # cos(2 d) = (cos^2 d - sin^2 d) = (dot^2 - cross^2) / (|g_p| |g_t|)^2; 0 where a gradient vanishes.
    cos2 = np.divide(dot * dot - cross * cross, norm2, out=np.zeros_like(norm2), where=norm2 > 1e-20)
    return float(np.clip((weight * cos2).sum() / weight_sum, 0.0, 1.0))


def _border_band(height: int, width: int, fraction: float) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels within ``fraction`` of the side from any edge."""
    band_y = max(1, int(round(fraction * height)))
    band_x = max(1, int(round(fraction * width)))
    mask = np.zeros((height, width), dtype=bool)
    mask[:band_y], mask[-band_y:], mask[:, :band_x], mask[:, -band_x:] = True, True, True, True
    return mask


def _hard_fail_reasons(pred: _Features, target: _Features, thresholds: HardFailThresholds) -> dict[str, bool]:
    """The three catastrophic-output tests (``blank``, ``border``, ``edges``) for one pair."""
    blank = pred.gray.std() < thresholds.blank_std <= target.gray.std()
    band = _border_band(*pred.gray.shape, thresholds.border_fraction)
    content = band & (target.peak > thresholds.black_level)
    lost = content & (pred.peak <= thresholds.black_level)
    n_content = int(content.sum())
    border = n_content > 0 and lost.sum() / n_content > thresholds.border_damage
    density_p, density_t = float(pred.edges.mean()), float(target.edges.mean())
    edges = density_t >= thresholds.min_target_edge_density and density_p < thresholds.edge_collapse * density_t
    return {"blank": bool(blank), "border": bool(border), "edges": bool(edges)}


# ----------------------------------------------------------------------------- per-image views

@dataclass(frozen=True)
class _ImageView:
    """One image with everything the sub-scores need from it alone (arrays as in :class:`_Features`)."""

    features: _Features
    lines: np.ndarray                       # centred straight-line evidence (n_rho, HOUGH_ANGLES)
    lines_norm: float                       # its L2 norm
    ssim_stats: tuple[np.ndarray, np.ndarray]  # uniform-window mean of gray and of gray ** 2
    grad_mag: np.ndarray                    # hypot(gx, gy)

    @property
    def nbytes(self) -> int:
        f = self.features
        arrays = (f.image, f.gray, f.peak, f.edges, f.gx, f.gy, self.lines, *self.ssim_stats, self.grad_mag)
        return sum(a.nbytes for a in arrays)


def _view(image: np.ndarray) -> _ImageView:
    """The :class:`_ImageView` of a float64 ``(H, W, 3)`` image in ``[0, 1]``."""
    features = _features(image)
    lines, norm = _centred_line_evidence(features.edges)
    return _ImageView(features, lines, norm, _ssim_window_stats(features.gray), np.hypot(features.gx, features.gy))


class _TargetCache:
    """Bounded LRU of target views, keyed by the shape and a digest of the float32 values.

    Targets repeat (a validation set is scored every epoch and against several baselines); their
    views are a pure function of those values, so a hit returns exactly what a miss would compute.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._views: OrderedDict[tuple, _ImageView] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(array32: np.ndarray) -> tuple:
        data = np.ascontiguousarray(array32)
        return data.shape, hashlib.blake2b(data.view(np.uint8), digest_size=16).digest()

    def view(self, array32: np.ndarray) -> _ImageView:
        key = self.key(array32)
        with self._lock:
            cached = self._views.get(key)
            if cached is not None:
                self._views.move_to_end(key)
                self.hits += 1
                return cached
        view = _view(_to_float64(array32))
        features = [getattr(view.features, f.name) for f in dataclasses.fields(view.features)]
        for array in (*features, view.lines, *view.ssim_stats, view.grad_mag):
            array.setflags(write=False)  # shared by every later hit: nobody may change it
        with self._lock:
            self.misses += 1
            if key not in self._views and view.nbytes <= self.max_bytes:
                self._views[key] = view
                self._bytes += view.nbytes
                while self._bytes > self.max_bytes:
                    _, dropped = self._views.popitem(last=False)
                    self._bytes -= dropped.nbytes
        return view

    def clear(self) -> None:
        with self._lock:
            self._views.clear()
            self._bytes = 0
            self.hits = self.misses = 0


_TARGETS = _TargetCache(TARGET_CACHE_MAX_BYTES)


class _ScoreMemo:
    """Bounded LRU of whole pair scores, keyed by both images' checked float32 values (what
    :func:`proxy_score` scores, so a torch and a numpy copy of an image share a key; the same digest
    as the target cache) and the weights and thresholds.

    For baselines (the identity warp, the ground-truth warp): the same baseline of the same pair
    recurs in every run on the same data in one process (a test session, ``pytest -m stage2_probe``),
    while a model's predictions almost never repeat, so only callers that pass ``memo=True`` use it.
    A hit returns the dict a miss would compute (a copy: callers may change theirs).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._scores: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def score(self, pred, target, weights: ProxyWeights | None, thresholds: HardFailThresholds | None) -> dict:
        key = (_TargetCache.key(_checked_float32(pred, "pred")), _TargetCache.key(_checked_float32(target, "target")),
               weights or ProxyWeights(), thresholds or HardFailThresholds())
        with self._lock:
            cached = self._scores.get(key)
            if cached is not None:
                self._scores.move_to_end(key)
                self.hits += 1
                return dict(cached)
        scores = proxy_score(pred, target, weights, thresholds=thresholds)
        with self._lock:
            self.misses += 1
            self._scores[key] = dict(scores)
            while len(self._scores) > self.max_entries:
                self._scores.popitem(last=False)
        return scores

    def clear(self) -> None:
        with self._lock:
            self._scores.clear()
            self.hits = self.misses = 0


SCORE_MEMO_MAX_ENTRIES = 8192  # pair scores kept for memo=True callers (a few hundred bytes each)
_SCORES = _ScoreMemo(SCORE_MEMO_MAX_ENTRIES)


def clear_target_cache() -> None:
    """Forget every cached target view and memoized baseline score (they are recomputed on the next
    use; scores do not change)."""
    _TARGETS.clear()
    _SCORES.clear()


def target_cache_info() -> dict[str, int]:
    """``hits``, ``misses``, ``entries`` and ``bytes`` of the target cache (this process)."""
    with _TARGETS._lock:
        return {"hits": _TARGETS.hits, "misses": _TARGETS.misses, "entries": len(_TARGETS._views),
                "bytes": _TARGETS._bytes}


# ----------------------------------------------------------------------------- public API

def proxy_score(pred, target, weights: ProxyWeights | None = None, *,
                thresholds: HardFailThresholds | None = None) -> dict:
    """Proxy challenge score of one pair.

    Args:
        pred: torch ``(3, H, W)`` or numpy ``(H, W, 3)``, float in ``[0, 1]``.
        target: torch ``(3, H, W)`` or numpy ``(H, W, 3)`` with the same ``(H, W)`` (the two kinds mix).
        weights: sub-score weights (default :class:`ProxyWeights`).
        thresholds: hard-fail thresholds (default :class:`HardFailThresholds`).

    Returns:
        ``{"total", "edge", "line", "grad", "ssim", "mae"}`` as python floats in ``[0, 1]`` and
        ``"hard_fail"`` as a python bool; ``total`` is 0.0 when ``hard_fail``.

    Raises:
        ValueError: wrong type, rank or channel count, non-float dtype, non-finite values, values
            outside ``[0, 1]``, sides below ``MIN_SIDE``, or ``pred`` and ``target`` shapes differ.
    """
    weights = ProxyWeights() if weights is None else weights
    thresholds = HardFailThresholds() if thresholds is None else thresholds
    if not isinstance(weights, ProxyWeights):
        raise ValueError(f"weights must be a ProxyWeights or None, got {type(weights).__name__}")
    if not isinstance(thresholds, HardFailThresholds):
        raise ValueError(f"thresholds must be a HardFailThresholds or None, got {type(thresholds).__name__}")
    pred_np = _to_hwc(pred, "pred")
    target32 = _checked_float32(target, "target")
    if pred_np.shape != target32.shape:
        raise ValueError(f"pred and target must have the same (H, W, 3) shape: expected {target32.shape} "
                         f"(target), got {pred_np.shape} (pred)")
    vp, vt = _view(pred_np), _TARGETS.view(target32)
    fp, ft = vp.features, vt.features
    scores = {
        "edge": edge_f1(fp.edges, ft.edges),
        "line": _line_correlation(vp.lines, vp.lines_norm, vt.lines, vt.lines_norm),
        "grad": _gradient_orientation(fp.gx, fp.gy, vp.grad_mag, ft.gx, ft.gy, vt.grad_mag),
        "ssim": float(np.clip(_ssim(fp.gray, vp.ssim_stats, ft.gray, vt.ssim_stats), 0.0, 1.0)),
        "mae": float(np.clip(1.0 - np.abs(pred_np - ft.image).mean(), 0.0, 1.0)),
    }
    hard_fail = any(_hard_fail_reasons(fp, ft, thresholds).values())
    normalized = weights.normalized()
    total = 0.0 if hard_fail else sum(normalized[k] * scores[k] for k in SUB_SCORES)
    return {"total": float(np.clip(total, 0.0, 1.0)), **scores, "hard_fail": bool(hard_fail)}


def proxy_score_batch(pred, target, weights: ProxyWeights | None = None, *,
                      thresholds: HardFailThresholds | None = None, memo: bool = False) -> dict:
    """Mean :func:`proxy_score` over a batch.

    Args:
        pred: torch ``(B, 3, H, W)`` or numpy ``(B, H, W, 3)``, float in ``[0, 1]``.
        target: torch ``(B, 3, H, W)`` or numpy ``(B, H, W, 3)`` with the same ``B``, ``H``, ``W``.
        memo: look each pair's score up by content first (for baselines, which recur across runs
            on the same data; the same scores as without it, at the cost of hashing both images).

    Returns:
        The keys of :func:`proxy_score` averaged over the batch as python floats (``hard_fail``
        becomes the fraction of hard-failed pairs) plus ``"count"`` (int, ``B``).
    """
    for name, value in (("pred", pred), ("target", target)):
        if isinstance(value, torch.Tensor):
            expected = "(B, 3, H, W)"
        elif isinstance(value, np.ndarray):
            expected = "(B, H, W, 3)"
        else:
            raise ValueError(f"{name} must be a torch.Tensor (B, 3, H, W) or numpy.ndarray (B, H, W, 3), "
                             f"got {type(value).__name__}")
        if value.ndim != 4:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"pred and target must have the same batch size: expected {target.shape[0]} "
                         f"(target), got {pred.shape[0]} (pred)")
    count = int(pred.shape[0])
    if count == 0:
        raise ValueError("pred and target must hold at least one pair, got batch size 0")
    sums = {key: 0.0 for key in SCORE_KEYS}
    for p, t in zip(pred, target):
        pair = _SCORES.score(p, t, weights, thresholds) if memo else proxy_score(p, t, weights, thresholds=thresholds)
        for key, value in pair.items():
            sums[key] += float(value)
    return {**{key: value / count for key, value in sums.items()}, "count": count}
