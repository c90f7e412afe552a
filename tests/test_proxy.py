"""autohdr.lens.proxy: calibration on real photographs, hard fails, input checks, batch helper, speed.

The photographs are the ones scikit-image ships inside its package (no download): centre-cropped
to a square and resized to 128x128 with anti-aliasing, float32 in [0, 1]. Distortions use the
package's own geometry: ``warp(image, brown_conrady_grid([k1, 0, 0, 0, 0, 0, 0, 1]))``.
"""

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage import data
from skimage.transform import resize

from autohdr.lens import proxy
from autohdr.lens.geometry import brown_conrady_grid, warp
from autohdr.lens.proxy import SCORE_KEYS, SUB_SCORES, HardFailThresholds, ProxyWeights, proxy_score, proxy_score_batch

SIZE = 128
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "brick", "rocket")
FLOAT_KEYS = tuple(key for key in SCORE_KEYS if key != "hard_fail")


@functools.lru_cache(maxsize=None)
def _photo(name: str, size: int) -> np.ndarray:
    image = getattr(data, name)()
    if image.ndim == 2:  # camera, brick: grey -> three equal channels
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    out = resize(square, (size, size), anti_aliasing=True).astype(np.float32)
    out.setflags(write=False)
    return out


def photo(name: str, size: int = SIZE) -> np.ndarray:
    """A scikit-image photograph as a fresh ``(size, size, 3)`` float32 array in [0, 1]."""
    return _photo(name, size).copy()


def distort(image: np.ndarray, k1: float, s: float = 1.0) -> np.ndarray:
    """``(H, W, 3)`` -> the same image warped by the Brown-Conrady grid of ``[k1, 0, 0, 0, 0, 0, 0, s]``."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    params = torch.tensor([[k1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, s]])
    warped = warp(tensor, brown_conrady_grid(params, *image.shape[:2]))
    return warped[0].permute(1, 2, 0).clamp(0.0, 1.0).numpy()


def black_frame(image: np.ndarray, width: int) -> np.ndarray:
    """``image`` with a black frame ``width`` pixels thick on every side."""
    out = image.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = 0.0, 0.0, 0.0, 0.0
    return out


def assert_valid_scores(scores: dict) -> None:
    assert set(scores) == set(SCORE_KEYS)
    assert isinstance(scores["hard_fail"], bool)
    for key in FLOAT_KEYS:
        assert isinstance(scores[key], float), key
        assert 0.0 <= scores[key] <= 1.0, (key, scores[key])


class TestProxyWeights:
    def test_defaults_normalize_to_one(self):
        normalized = ProxyWeights().normalized()
        assert normalized == pytest.approx({"edge": 0.40, "line": 0.22, "grad": 0.18, "ssim": 0.15, "mae": 0.05})
        assert sum(normalized.values()) == pytest.approx(1.0)

    def test_normalizes_by_the_sum(self):
        assert ProxyWeights(edge=2.0, line=2.0, grad=0.0, ssim=0.0, mae=0.0).normalized()["edge"] == 0.5

    def test_negative_weight_raises(self):
        with pytest.raises(ValueError, match="'line' must be finite and >= 0, got -0.1"):
            ProxyWeights(line=-0.1)

    def test_zero_sum_raises(self):
        with pytest.raises(ValueError, match="positive sum, got 0"):
            ProxyWeights(edge=0, line=0, grad=0, ssim=0, mae=0)

    def test_non_number_raises(self):
        with pytest.raises(ValueError, match="'ssim' must be a number, got str"):
            ProxyWeights(ssim="0.15")

    def test_weights_change_the_total(self):
        target = photo("astronaut")
        pred = distort(target, 0.1)
        edge_only = proxy_score(pred, target, ProxyWeights(edge=1, line=0, grad=0, ssim=0, mae=0))
        assert edge_only["total"] == pytest.approx(edge_only["edge"])
        mae_only = proxy_score(pred, target, ProxyWeights(edge=0, line=0, grad=0, ssim=0, mae=3))
        assert mae_only["total"] == pytest.approx(mae_only["mae"])


class TestHardFailThresholds:
    def test_border_fraction_out_of_range_raises(self):
        with pytest.raises(ValueError, match=r"border_fraction must be in \(0, 0.5\], got 0.7"):
            HardFailThresholds(border_fraction=0.7)

    def test_negative_raises(self):
        with pytest.raises(ValueError, match="'blank_std' must be >= 0, got -1"):
            HardFailThresholds(blank_std=-1)


class TestProxyScoreCalibration:
    @pytest.mark.parametrize("name", PHOTOS)
    def test_self_score_is_perfect(self, name):
        target = photo(name)
        scores = proxy_score(target, target)
        assert scores["total"] >= 0.99
        assert not scores["hard_fail"]
        for key in SUB_SCORES:
            assert scores[key] >= 0.99, key

    @pytest.mark.parametrize("name", PHOTOS)
    def test_stronger_barrel_distortion_scores_lower(self, name):
        target = photo(name)
        clean, mild, strong = (proxy_score(distort(target, k1), target) for k1 in (0.0, 0.1, 0.3))
        assert not (clean["hard_fail"] or mild["hard_fail"] or strong["hard_fail"])
        # Margins: at 128x128 the six photos give total ~1.0 / 0.50-0.62 / 0.41-0.48.
        assert clean["total"] > mild["total"] + 0.2
        assert mild["total"] > strong["total"] + 0.02
        for key in ("edge", "line", "grad", "ssim", "mae"):
            assert clean[key] > mild[key] > strong[key], key

    @pytest.mark.parametrize("name", ["astronaut", "camera", "brick"])
    def test_stronger_pincushion_distortion_scores_lower(self, name):
        target = photo(name)
        clean, mild, strong = (proxy_score(distort(target, k1), target) for k1 in (0.0, -0.1, -0.3))
        assert clean["total"] > mild["total"] > strong["total"]

    def test_small_distortions_are_ranked(self):
        # A near-correct prediction must beat a slightly worse one: the training signal lives here.
        target = photo("astronaut")
        totals = [proxy_score(distort(target, k1), target)["total"] for k1 in (0.0, 0.02, 0.05, 0.1)]
        assert totals == sorted(totals, reverse=True)
        assert len(set(totals)) == len(totals)

    def test_unrelated_photo_scores_low(self):
        scores = proxy_score(photo("coffee"), photo("astronaut"))
        assert scores["total"] < 0.5
        assert scores["line"] < 0.4

    def test_mae_is_one_minus_mean_absolute_error(self):
        target = photo("chelsea")
        pred = np.clip(target + 0.05, 0.0, 1.0)
        expected = 1.0 - float(np.abs(pred.astype(np.float64) - target.astype(np.float64)).mean())
        assert proxy_score(pred, target)["mae"] == pytest.approx(expected, abs=1e-6)


class TestHardFail:
    @pytest.mark.parametrize("value", [0.0, 0.5])
    def test_constant_image_fails(self, value):
        target = photo("astronaut")
        scores = proxy_score(np.full_like(target, value), target)
        assert scores["hard_fail"] is True
        assert scores["total"] == 0.0
        assert_valid_scores(scores)

    def test_heavy_black_border_fails(self):
        target = photo("camera")
        scores = proxy_score(black_frame(target, SIZE // 4), target)
        assert scores["hard_fail"] is True
        assert scores["total"] == 0.0
        assert scores["mae"] > 0.0  # sub-scores are still reported

    def test_collapsed_edges_fail(self):
        target = photo("coffee")
        blurred = ndi.gaussian_filter(target, sigma=(8, 8, 0))
        assert proxy_score(blurred, target)["hard_fail"] is True

    @pytest.mark.parametrize("pred_fn", [lambda t: distort(t, 0.3), lambda t: distort(t, 0.6),
                                         lambda t: distort(t, -0.3), lambda t: black_frame(t, 4)],
                             ids=["k1=0.3", "k1=0.6", "k1=-0.3", "thin_frame"])
    def test_ordinary_warps_do_not_fail(self, pred_fn):
        target = photo("astronaut")
        scores = proxy_score(pred_fn(target), target)
        assert scores["hard_fail"] is False
        assert scores["total"] > 0.3

    def test_constant_target_and_pred_do_not_fail(self):
        flat = np.full((32, 32, 3), 0.4, dtype=np.float32)
        scores = proxy_score(flat, flat)
        assert scores["hard_fail"] is False
        assert scores["total"] == pytest.approx(1.0)

    def test_thresholds_are_used(self):
        target = photo("camera")
        pred = black_frame(target, SIZE // 4)
        lenient = HardFailThresholds(border_damage=1.0)
        assert proxy_score(pred, target, thresholds=lenient)["hard_fail"] is False


class TestProxyScoreInputs:
    def test_keys_types_and_ranges(self):
        target = photo("rocket")
        assert_valid_scores(proxy_score(distort(target, 0.2), target))

    def test_torch_and_numpy_inputs_agree(self):
        target = photo("chelsea")
        pred = distort(target, 0.1)
        from_numpy = proxy_score(pred, target)
        from_torch = proxy_score(torch.from_numpy(pred).permute(2, 0, 1), torch.from_numpy(target).permute(2, 0, 1))
        mixed = proxy_score(torch.from_numpy(pred).permute(2, 0, 1).double(), target.astype(np.float64))
        assert from_torch == from_numpy
        assert mixed == from_numpy

    def test_requires_grad_tensor_is_accepted(self):
        target = torch.from_numpy(photo("camera")).permute(2, 0, 1)
        pred = target.clone().requires_grad_(True)
        assert proxy_score(pred, target)["total"] >= 0.99

    @pytest.mark.parametrize("pred, match", [
        (torch.rand(1, 3, 32, 32), r"shape \(3, H, W\).*got \(1, 3, 32, 32\)"),
        (torch.rand(4, 32, 32), r"shape \(3, H, W\).*got \(4, 32, 32\)"),
        (np.zeros((32, 32, 4)), r"shape \(H, W, 3\), got \(32, 32, 4\)"),
        (np.zeros((32, 32)), r"shape \(H, W, 3\), got \(32, 32\)"),
        (torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), "floating-point tensor.*got dtype torch.uint8"),
        (np.zeros((32, 32, 3), dtype=np.uint8), "floating-point array.*got dtype uint8"),
        (np.full((32, 32, 3), np.nan), "finite values only, got 3072 NaN/inf"),
        (torch.full((3, 32, 32), float("inf")), "finite values only"),
        (np.full((32, 32, 3), 1.5), r"values in \[0, 1\], got range \[1.5, 1.5\]"),
        (np.zeros((8, 8, 3)), "at least 16x16 pixels, got 8x8"),
        ([[0.0]], "torch.Tensor.*or numpy.ndarray.*got list"),
    ], ids=["batched", "channels_torch", "channels_numpy", "rank_numpy", "int_torch", "int_numpy", "nan", "inf",
            "range", "too_small", "list"])
    def test_bad_pred_raises(self, pred, match):
        with pytest.raises(ValueError, match=match):
            proxy_score(pred, torch.rand(3, 32, 32))

    def test_bad_target_is_named(self):
        with pytest.raises(ValueError, match=r"target must be a numpy array of shape \(H, W, 3\)"):
            proxy_score(np.zeros((32, 32, 3)), np.zeros((3, 32, 32)))

    def test_shape_mismatch_raises(self):
        with pytest.raises(ValueError, match=r"same \(H, W, 3\) shape: expected \(32, 32, 3\) \(target\), "
                                             r"got \(32, 48, 3\) \(pred\)"):
            proxy_score(np.zeros((32, 48, 3)), np.zeros((32, 32, 3)))

    def test_weights_of_wrong_type_raise(self):
        with pytest.raises(ValueError, match="weights must be a ProxyWeights or None, got dict"):
            proxy_score(np.zeros((32, 32, 3)), np.zeros((32, 32, 3)), {"edge": 1.0})

    def test_slight_overshoot_is_clipped(self):
        # Within RANGE_TOLERANCE (1e-3) values are clipped to [0, 1], not rejected.
        target = photo("astronaut")
        bright = target.copy()
        bright[40:80, 40:80] = 1.0008
        assert proxy_score(bright, target) == proxy_score(np.clip(bright, 0.0, 1.0), target)


class TestProxyScoreBatch:
    def test_equals_mean_of_single_scores(self):
        targets = np.stack([photo(name) for name in ("astronaut", "camera", "brick")])
        preds = np.stack([distort(targets[0], 0.1), np.zeros_like(targets[1]), targets[2]])
        singles = [proxy_score(p, t) for p, t in zip(preds, targets)]
        batch = proxy_score_batch(torch.from_numpy(preds).permute(0, 3, 1, 2),
                                  torch.from_numpy(targets).permute(0, 3, 1, 2))
        assert batch["count"] == 3
        assert batch["hard_fail"] == pytest.approx(1 / 3)
        for key in FLOAT_KEYS:
            assert batch[key] == pytest.approx(np.mean([s[key] for s in singles]), abs=1e-12), key
        assert proxy_score_batch(preds, targets) == batch  # numpy (B, H, W, 3) gives the same

    @pytest.mark.parametrize("pred, target, match", [
        (torch.rand(3, 32, 32), torch.rand(3, 32, 32), r"shape \(B, 3, H, W\), got \(3, 32, 32\)"),
        (np.zeros((32, 32, 3)), np.zeros((32, 32, 3)), r"shape \(B, H, W, 3\), got \(32, 32, 3\)"),
        (torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32), "same batch size: expected 3 \\(target\\), got 2"),
        (torch.rand(0, 3, 32, 32), torch.rand(0, 3, 32, 32), "at least one pair, got batch size 0"),
        ("image", torch.rand(1, 3, 32, 32), "torch.Tensor \\(B, 3, H, W\\) or numpy.ndarray.*got str"),
    ], ids=["rank_torch", "rank_numpy", "batch_mismatch", "empty", "type"])
    def test_bad_input_raises(self, pred, target, match):
        with pytest.raises(ValueError, match=match):
            proxy_score_batch(pred, target)


@st.composite
def image_pairs(draw):
    """A random ``(H, W, 3)`` image (smooth blobs plus texture) and a slightly noisy copy."""
    seed = draw(st.integers(0, 2**32 - 1))
    height, width = draw(st.integers(16, 48)), draw(st.integers(16, 48))
    noise = draw(st.floats(0.0, 0.1))
    rng = np.random.default_rng(seed)
    base = ndi.gaussian_filter(rng.random((height, width, 3)), sigma=(draw(st.floats(0.0, 3.0)),) * 2 + (0,))
    base = (base - base.min()) / max(float(np.ptp(base)), 1e-6)
    pred = np.clip(base + rng.normal(0.0, noise, base.shape), 0.0, 1.0)
    return pred.astype(np.float32), base.astype(np.float32)


class TestProxyScoreProperties:
    @given(pair=image_pairs())
    @settings(max_examples=25, deadline=None)
    def test_scores_in_range_and_self_score_is_the_max(self, pair):
        pred, target = pair
        scores = proxy_score(pred, target)
        best = proxy_score(target, target)
        assert_valid_scores(scores)
        assert best["hard_fail"] is False
        for key in FLOAT_KEYS:
            assert best[key] == pytest.approx(1.0)
            assert scores[key] <= best[key] + 1e-9, key


@pytest.mark.benchmark(group="proxy")
def test_speed_per_pair_at_128(benchmark):
    target = photo("astronaut")
    pred = distort(target, 0.1)
    scores = benchmark.pedantic(proxy_score, args=(pred, target), rounds=30, iterations=1, warmup_rounds=3)
    assert 0.0 < scores["total"] < 1.0
    if benchmark.stats is not None:  # None under --benchmark-disable / xdist
        benchmark.extra_info["ms_per_pair_median"] = benchmark.stats.stats.median * 1e3


# ----------------------------------------------------------------------------- target cache

def _uncached_definition(pred, target, weights=None, thresholds=None) -> dict:
    """The proxy as defined before targets were cached: both images' features computed afresh and
    scikit-image's own ``structural_similarity`` (the reference the cached path must equal bit for bit)."""
    from skimage.metrics import structural_similarity

    weights, thresholds = weights or ProxyWeights(), thresholds or HardFailThresholds()
    pred_np, target_np = proxy._to_hwc(pred, "pred"), proxy._to_hwc(target, "target")
    fp, ft = proxy._features(pred_np), proxy._features(target_np)
    scores = {
        "edge": proxy.edge_f1(fp.edges, ft.edges),
        "line": proxy.line_straightness(fp.edges, ft.edges),
        "grad": proxy.gradient_orientation(fp.gx, fp.gy, ft.gx, ft.gy),
        "ssim": float(np.clip(structural_similarity(fp.gray, ft.gray, data_range=1.0), 0.0, 1.0)),
        "mae": float(np.clip(1.0 - np.abs(pred_np - target_np).mean(), 0.0, 1.0)),
    }
    hard_fail = any(proxy._hard_fail_reasons(fp, ft, thresholds).values())
    normalized = weights.normalized()
    total = 0.0 if hard_fail else sum(normalized[k] * scores[k] for k in SUB_SCORES)
    return {"total": float(np.clip(total, 0.0, 1.0)), **scores, "hard_fail": bool(hard_fail)}


def _cache_pairs():
    """Pairs covering each sub-score's branches: distortions, noise, black frames, blank, identical, flat."""
    rng = np.random.default_rng(7)
    for name in ("astronaut", "camera", "brick"):
        target = photo(name)
        noisy = np.clip(target + rng.normal(0.0, 0.05, target.shape), 0.0, 1.0).astype(np.float32)
        for pred in (distort(target, 0.1), distort(target, -0.3, 0.9), noisy, black_frame(target, 40),
                     np.zeros_like(target), target.copy(), photo("coffee")):
            yield pred, target
    flat = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    yield flat, flat.copy()
    yield photo("rocket"), flat


class TestBaselineScoreMemo:
    """``proxy_score_batch(..., memo=True)``: whole pair scores looked up by both images' content."""

    @staticmethod
    def _batch(*images: np.ndarray) -> torch.Tensor:
        return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])

    def test_memoized_scores_equal_the_computed_ones_on_misses_and_hits(self):
        proxy.clear_target_cache()
        pairs = list(_cache_pairs())[:8]
        preds, targets = self._batch(*(p for p, _ in pairs)), self._batch(*(t for _, t in pairs))
        expected = proxy_score_batch(preds, targets)
        assert proxy_score_batch(preds, targets, memo=True) == expected  # misses
        assert proxy_score_batch(preds, targets, memo=True) == expected  # hits
        assert (proxy._SCORES.hits, proxy._SCORES.misses) == (len(pairs), len(pairs))

    def test_a_pair_differing_in_either_image_or_the_weights_is_scored_anew(self):
        proxy.clear_target_cache()
        target = photo("astronaut")
        pred = distort(target, 0.1)
        changed = target.copy()
        changed[60:70, 60:70] = 0.0
        first = proxy_score_batch(self._batch(pred), self._batch(target), memo=True)
        for p, t, weights in ((pred, changed, None), (changed, target, None),
                              (pred, target, proxy.ProxyWeights(edge=1.0, line=0.0, grad=0.0, ssim=0.0, mae=0.0))):
            again = proxy_score_batch(self._batch(p), self._batch(t), weights, memo=True)
            assert again == proxy_score_batch(self._batch(p), self._batch(t), weights) != first
        assert proxy._SCORES.hits == 0

    def test_a_caller_changing_its_result_does_not_change_the_memo(self):
        proxy.clear_target_cache()
        target = photo("camera")
        pred, batch = self._batch(distort(target, 0.1)), self._batch(target)
        proxy._SCORES.score(pred[0], batch[0], None, None)["total"] = -1.0  # a miss's result
        proxy._SCORES.score(pred[0], batch[0], None, None)["total"] = -2.0  # a hit's
        assert proxy._SCORES.score(pred[0], batch[0], None, None)["total"] == proxy_score(pred[0], batch[0])["total"]

    def test_a_torch_and_a_numpy_copy_of_a_pair_share_one_entry(self):
        proxy.clear_target_cache()
        target = photo("camera")
        pred = distort(target, 0.1)
        as_numpy = proxy._SCORES.score(pred, target, None, None)
        as_torch = proxy._SCORES.score(torch.from_numpy(pred).permute(2, 0, 1), torch.from_numpy(target).permute(2, 0, 1),
                                       None, None)
        assert as_torch == as_numpy == proxy_score(pred, target)
        assert (proxy._SCORES.hits, proxy._SCORES.misses) == (1, 1)

    def test_the_memo_keeps_at_most_its_bound(self):
        memo = proxy._ScoreMemo(max_entries=2)
        target = photo("camera")
        for amount in (0.05, 0.1, 0.15):
            memo.score(distort(target, amount), target, None, None)
        assert len(memo._scores) == 2 and memo.misses == 3


class TestTargetCache:
    def test_scores_are_bit_identical_to_the_uncached_definition_on_misses_and_hits(self):
        proxy.clear_target_cache()
        for pred, target in _cache_pairs():
            expected = _uncached_definition(pred, target)
            assert proxy_score(pred, target) == expected  # exact equality, every key
            assert proxy_score(pred, target) == expected  # the same target again: a cache hit
            as_torch = torch.from_numpy(target).permute(2, 0, 1)
            assert proxy_score(pred, as_torch) == expected  # the same values as a tensor
        info = proxy.target_cache_info()
        assert info["hits"] > 0 and info["misses"] > 0

    def test_ssim_equals_scikit_images_bit_for_bit(self):
        from skimage.metrics import structural_similarity

        rng = np.random.default_rng(3)
        for shape in ((16, 16), (17, 40), (128, 128)):
            a, b = rng.random(shape), rng.random(shape)
            b[: shape[0] // 2] = a[: shape[0] // 2]
            ours = proxy._ssim(a, proxy._ssim_window_stats(a), b, proxy._ssim_window_stats(b))
            assert ours == structural_similarity(a, b, data_range=1.0)

    def test_each_distinct_target_is_computed_once(self):
        proxy.clear_target_cache()
        targets = [photo(name) for name in ("astronaut", "camera")]
        for _ in range(3):
            for target in targets:
                proxy_score(distort(target, 0.1), target)
        info = proxy.target_cache_info()
        assert (info["misses"], info["hits"], info["entries"]) == (2, 4, 2)

    def test_a_changed_target_is_not_confused_with_the_cached_one(self):
        proxy.clear_target_cache()
        target = photo("astronaut")
        pred = distort(target, 0.1)
        before = proxy_score(pred, target)
        changed = target.copy()
        changed[60:70, 60:70] = 0.0
        assert proxy_score(pred, changed) == _uncached_definition(pred, changed) != before

    def test_cached_views_are_read_only(self):
        proxy.clear_target_cache()
        target = photo("camera")
        view = proxy._TARGETS.view(target)
        with pytest.raises(ValueError, match="read-only"):
            view.features.gray[0, 0] = 1.0

    def test_the_cache_stays_within_its_byte_bound(self):
        cache = proxy._TargetCache(max_bytes=4 * 2**20)  # about 2 views at 128x128
        for name in PHOTOS:
            cache.view(photo(name))
        assert 0 < cache._bytes <= cache.max_bytes and len(cache._views) < len(PHOTOS)
        assert list(cache._views)[-1] == cache.key(photo(PHOTOS[-1]))  # the newest is kept


@pytest.mark.benchmark(group="proxy")
def test_speed_per_pair_at_128_target_cached(benchmark):
    target = photo("astronaut")
    pred = distort(target, 0.1)
    proxy_score(pred, target)  # the target's view is cached from here on
    scores = benchmark.pedantic(proxy_score, args=(pred, target), rounds=30, iterations=1, warmup_rounds=3)
    assert scores == _uncached_definition(pred, target)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_pair_median"] = benchmark.stats.stats.median * 1e3
