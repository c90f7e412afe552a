"""Tests of autohdr.lens.losses: one class per public function (smoke, shape, exception, gradcheck, reference).

Real-image checks use skimage's astronaut photo resized to 64x64 and warped with
``brown_conrady_grid`` (barrel ``k1``) or shifted with ``torch.roll``. Reference values are worked
out by hand in the comment next to each one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from skimage import data, transform

from autohdr.lens.geometry import brown_conrady_grid, identity_grid, identity_params, warp
from autohdr.lens.losses import (
    IMAGE_TERMS,
    LOSS_TERMS,
    RESIDUAL_TERMS,
    LossWeights,
    charbonnier,
    composite_loss,
    edge_loss,
    flow_curv,
    flow_mag,
    flow_tv,
    grad_orient_loss,
    jacobian_fold_penalty,
    multiscale_loss,
    ssim_loss,
)

# One tolerance table per dtype, behind one helper.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
}


def assert_close(actual, expected, dtype=None):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``actual``'s)."""
    if not isinstance(actual, torch.Tensor):
        actual = torch.as_tensor(actual)
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected, dtype=actual.dtype)
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


IMAGE_LOSSES = {
    "charbonnier": charbonnier,
    "ssim_loss": ssim_loss,
    "edge_loss": edge_loss,
    "grad_orient_loss": grad_orient_loss,
    "multiscale_loss": multiscale_loss,
}
# Value of each image loss for identical images: charbonnier-based terms sit at eps = 1e-3.
IDENTICAL_FLOOR = {"charbonnier": 1e-3, "ssim_loss": 0.0, "edge_loss": 0.0, "grad_orient_loss": 0.0,
                   "multiscale_loss": 1e-3}
FLOW_LOSSES = {"flow_tv": flow_tv, "flow_mag": flow_mag, "flow_curv": flow_curv}


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """skimage's astronaut, ``(1, 3, 64, 64)`` float32 in [0, 1]."""
    img = transform.resize(data.astronaut(), (64, 64), anti_aliasing=True)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float()


def barrel(image: torch.Tensor, k1: float) -> torch.Tensor:
    """``image`` warped by a Brown-Conrady grid with only ``k1`` set."""
    params = identity_params(image.shape[0], dtype=image.dtype)
    params[:, 0] = k1
    return warp(image, brown_conrady_grid(params, image.shape[-2], image.shape[-1]))


def random_pair(shape=(2, 3, 16, 16), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=dtype), torch.rand(shape, generator=gen, dtype=dtype))


def ramp_x(height: int, width: int, slope: float, dtype=torch.float64) -> torch.Tensor:
    """Grey image ``(1, 3, H, W)`` with value ``slope * column``."""
    cols = torch.arange(width, dtype=dtype) * slope
    return cols.view(1, 1, 1, width).expand(1, 3, height, width).clone()


# ----------------------------------------------------------------------------- shared image-term checks

@pytest.mark.parametrize("name", list(IMAGE_LOSSES))
class TestImageTermsCommon:
    """Properties every image term shares."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_shape_dtype(self, name, dtype):
        pred, target = random_pair(dtype=dtype)
        out = IMAGE_LOSSES[name](pred, target)
        assert out.shape == ()
        assert out.dtype == dtype
        assert out.device == pred.device

    def test_identical_is_floor(self, name, astronaut):
        out = IMAGE_LOSSES[name](astronaut, astronaut.clone())
        assert_close(out, IDENTICAL_FLOOR[name])

    def test_different_is_positive(self, name, astronaut):
        out = IMAGE_LOSSES[name](barrel(astronaut, 0.05), astronaut)
        assert out > IDENTICAL_FLOOR[name] + 1e-3

    def test_grows_with_warp(self, name, astronaut):
        values = [float(IMAGE_LOSSES[name](barrel(astronaut, k), astronaut)) for k in (0.0, 0.02, 0.08, 0.3)]
        assert values == sorted(values) and len(set(values)) == len(values), values

    def test_grows_with_shift(self, name, astronaut):
        values = [float(IMAGE_LOSSES[name](torch.roll(astronaut, s, dims=-1), astronaut)) for s in (0, 1, 2, 4)]
        assert values == sorted(values) and len(set(values)) == len(values), values

    def test_gradient_reaches_pred(self, name, astronaut):
        pred = barrel(astronaut, 0.05).requires_grad_(True)
        IMAGE_LOSSES[name](pred, astronaut).backward()
        assert pred.grad is not None
        assert torch.isfinite(pred.grad).all()
        assert pred.grad.abs().sum() > 0

    def test_batch_is_mean_of_samples(self, name):
        pred, target = random_pair(shape=(3, 3, 12, 12), seed=3)
        batched = IMAGE_LOSSES[name](pred, target)
        single = torch.stack([IMAGE_LOSSES[name](pred[i:i + 1], target[i:i + 1]) for i in range(3)]).mean()
        assert_close(batched, single)

    def test_exception_shape_mismatch(self, name):
        pred, _ = random_pair(shape=(1, 3, 16, 16))
        target, _ = random_pair(shape=(1, 3, 16, 12))
        with pytest.raises(ValueError, match=r"expected \(1, 3, 16, 16\).*got \(1, 3, 16, 12\)"):
            IMAGE_LOSSES[name](pred, target)

    def test_exception_channels(self, name):
        pred, target = random_pair(shape=(1, 1, 16, 16))
        with pytest.raises(ValueError, match=r"pred must have shape \(B, 3, H, W\), got \(1, 1, 16, 16\)"):
            IMAGE_LOSSES[name](pred, target)


# ----------------------------------------------------------------------------- per-function classes

class TestCharbonnier:
    def test_smoke(self):
        pred, target = random_pair()
        assert charbonnier(pred, target) > 0

    def test_reference(self):
        # A constant difference d everywhere gives sqrt(d^2 + eps^2) = sqrt(0.09 + 1e-6).
        pred = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
        target = torch.full((2, 3, 4, 4), 0.2, dtype=torch.float64)
        assert_close(charbonnier(pred, target), (0.3 ** 2 + 1e-6) ** 0.5)
        assert_close(charbonnier(pred, pred, eps=0.1), 0.1)

    def test_exception(self):
        pred, target = random_pair()
        with pytest.raises(ValueError, match="eps must be > 0"):
            charbonnier(pred, target, eps=0.0)

    def test_gradcheck(self):
        pred, target = random_pair(shape=(1, 3, 3, 4), dtype=torch.float64)
        pred.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: charbonnier(p, target), (pred,))


class TestSSIMLoss:
    def test_smoke(self):
        pred, target = random_pair()
        assert 0 < ssim_loss(pred, target) <= 2

    def test_reference_constant_images(self):
        # Constant images a, b: means a, b, variances and covariance 0, so
        # SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = 1e-4.
        a, b, c1 = 0.6, 0.3, 0.01 ** 2
        pred = torch.full((1, 3, 9, 9), a, dtype=torch.float64)
        target = torch.full((1, 3, 9, 9), b, dtype=torch.float64)
        expected = 1 - (2 * a * b + c1) / (a * a + b * b + c1)
        torch.testing.assert_close(ssim_loss(pred, target), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-8)

    def test_window_sizes(self):
        pred, target = random_pair()
        assert ssim_loss(pred, target, window=3) > 0
        assert ssim_loss(pred, target, window=11) > 0

    def test_exception(self):
        pred, target = random_pair(shape=(1, 3, 6, 16))
        with pytest.raises(ValueError, match=r"H, W >= window=7, got \(H, W\) = \(6, 16\)"):
            ssim_loss(pred, target)
        with pytest.raises(ValueError, match="odd int >= 3"):
            ssim_loss(pred, target, window=4)

    def test_gradcheck(self):
        pred, target = random_pair(shape=(1, 3, 7, 8), dtype=torch.float64)
        pred.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: ssim_loss(p, target, window=5), (pred,))


class TestEdgeLoss:
    def test_smoke(self):
        pred, target = random_pair()
        assert edge_loss(pred, target) > 0

    def test_reference_ramp(self):
        # Luminance c * column on 5 columns, Sobel /8 with replicated border: |grad| is c in the
        # 3 inner columns and c/2 in the 2 border columns -> mean (3c + c) / 5 = 0.8 c vs a flat image.
        c = 0.1
        pred = ramp_x(4, 5, c)
        target = torch.full_like(pred, 0.3)
        torch.testing.assert_close(edge_loss(pred, target), torch.tensor(0.8 * c, dtype=torch.float64),
                                   rtol=0, atol=1e-6)

    def test_ignores_uniform_brightness(self):
        pred, _ = random_pair(dtype=torch.float64)
        assert_close(edge_loss(pred + 0.1, pred), 0.0)

    def test_exception(self):
        pred, target = random_pair()
        with pytest.raises(ValueError, match="eps must be > 0"):
            edge_loss(pred, target, eps=-1.0)

    def test_gradcheck(self):
        pred, target = random_pair(shape=(1, 3, 4, 5), dtype=torch.float64)
        pred.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: edge_loss(p, target), (pred,))


class TestGradOrientLoss:
    def test_smoke(self):
        pred, target = random_pair()
        assert 0 < grad_orient_loss(pred, target) <= 2

    def test_reference_polarity_invariant(self):
        # Inverting the image flips every gradient by 180 degrees: cos(2 * 180) = 1 -> loss 0.
        pred, _ = random_pair(dtype=torch.float64)
        assert_close(grad_orient_loss(1.0 - pred, pred), 0.0)

    def test_reference_perpendicular(self):
        # Ramp along x vs ramp along y: gradients are perpendicular at every pixel (replicated
        # borders keep them axis-aligned), cos(2 * 90) = -1 -> loss 2.
        pred = ramp_x(6, 6, 0.1)
        target = pred.transpose(-1, -2).contiguous()
        assert_close(grad_orient_loss(pred, target), 2.0)

    def test_flat_images_are_smooth(self):
        # No atan2: flat (zero-gradient) inputs give a finite loss and finite gradients.
        pred = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
        target = torch.full((1, 3, 8, 8), 0.2)
        out = grad_orient_loss(pred, target)
        out.backward()
        assert_close(out.detach(), 0.0)
        assert torch.isfinite(pred.grad).all()

    def test_exception(self):
        pred, target = random_pair()
        with pytest.raises(ValueError, match="eps must be > 0"):
            grad_orient_loss(pred, target, eps=0.0)

    def test_gradcheck(self):
        pred, target = random_pair(shape=(1, 3, 4, 5), dtype=torch.float64)
        pred.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: grad_orient_loss(p, target), (pred,))


class TestMultiscaleLoss:
    def test_smoke(self):
        pred, target = random_pair()
        assert multiscale_loss(pred, target) > 1e-3

    def test_reference_pooling(self):
        # Scale 2 pools 2x2 blocks: the block mean done by hand with reshape, then charbonnier.
        pred, target = random_pair(shape=(2, 3, 8, 8), dtype=torch.float64)

        def pool2(x):
            return x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))

        assert_close(multiscale_loss(pred, target, scales=(2,)), charbonnier(pool2(pred), pool2(target)))
        expected = (charbonnier(pool2(pred), pool2(target)) + charbonnier(pred, target)) / 2
        assert_close(multiscale_loss(pred, target, scales=(1, 2)), expected)

    def test_exception(self):
        pred, target = random_pair(shape=(1, 3, 8, 8))
        with pytest.raises(ValueError, match="non-empty"):
            multiscale_loss(pred, target, scales=())
        with pytest.raises(ValueError, match=r"int in \[1, min\(H, W\)=8\], got 16"):
            multiscale_loss(pred, target, scales=(2, 16))
        with pytest.raises(ValueError, match="got 0"):
            multiscale_loss(pred, target, scales=(0,))

    def test_gradcheck(self):
        pred, target = random_pair(shape=(1, 3, 4, 4), dtype=torch.float64)
        pred.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: multiscale_loss(p, target), (pred,))


# ----------------------------------------------------------------------------- flow terms

def flow_of(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Stack ``(h, w)`` x and y fields into a ``(1, 2, h, w)`` float64 flow."""
    return torch.stack((fx, fy)).unsqueeze(0).to(torch.float64)


def linear_ramp_flow(h: int = 5, w: int = 6) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    return flow_of(0.3 * xs - 0.2 * ys + 1.0, 0.1 * xs + 0.5 * ys - 2.0)


@pytest.mark.parametrize("name", list(FLOW_LOSSES))
class TestFlowTermsCommon:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_zero_flow(self, name, dtype):
        out = FLOW_LOSSES[name](torch.zeros(2, 2, 6, 7, dtype=dtype))
        assert out.shape == () and out.dtype == dtype
        assert_close(out, 0.0)

    def test_gradcheck(self, name):
        flow = torch.randn(2, 2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        flow.requires_grad_(True)
        assert torch.autograd.gradcheck(FLOW_LOSSES[name], (flow,))

    def test_tiny_flow_is_finite(self, name):
        # Axes too short for a difference contribute nothing instead of a NaN mean of nothing.
        for shape in ((1, 2, 1, 1), (1, 2, 2, 2), (1, 2, 1, 4)):
            out = FLOW_LOSSES[name](torch.randn(shape))
            assert torch.isfinite(out)

    def test_exception(self, name):
        with pytest.raises(ValueError, match=r"shape \(B, 2, h, w\), got \(1, 3, 4, 4\)"):
            FLOW_LOSSES[name](torch.zeros(1, 3, 4, 4))
        with pytest.raises(ValueError, match=r"got \(2, 4, 4\)"):
            FLOW_LOSSES[name](torch.zeros(2, 4, 4))


class TestFlowTV:
    def test_constant_flow(self):
        flow = torch.ones(1, 2, 4, 4, dtype=torch.float64) * torch.tensor([1.5, -2.0]).view(1, 2, 1, 1)
        assert_close(flow_tv(flow), 0.0)

    def test_reference_ramp(self):
        # f = 0.4 * column in both channels: |d/dx| = 0.4, |d/dy| = 0 -> (0.4 + 0) / 2.
        xs = torch.arange(5, dtype=torch.float64).expand(3, 5) * 0.4
        assert_close(flow_tv(flow_of(xs, xs)), 0.2)


class TestFlowMag:
    def test_constant_flow_is_penalized(self):
        # (fx, fy) = (1, 2) everywhere: mean squared magnitude 1 + 4 = 5.
        flow = torch.ones(2, 2, 3, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
        assert_close(flow_mag(flow), 5.0)
        assert_close(flow_tv(flow), 0.0)


class TestFlowCurv:
    def test_linear_ramp_is_zero(self):
        assert_close(flow_curv(linear_ramp_flow()), 0.0)
        assert flow_tv(linear_ramp_flow()) > 0

    def test_reference_quadratic(self):
        # f = column^2 in both channels: second difference 2 along x, 0 along y -> (2 + 0) / 2 = 1.
        xs = (torch.arange(6, dtype=torch.float64) ** 2).expand(4, 6)
        assert_close(flow_curv(flow_of(xs, xs)), 1.0)


# ----------------------------------------------------------------------------- jacobian penalty

def folded_grid(height: int = 8, width: int = 10, dtype=torch.float32) -> torch.Tensor:
    """Identity grid with x mirrored in the right half: it runs backwards there, ``det < 0``."""
    grid = identity_grid(1, height, width, dtype=dtype)
    grid[:, :, width // 2:, 0] = -grid[:, :, width // 2:, 0]
    return grid


class TestJacobianFoldPenalty:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_identity_is_zero(self, dtype):
        out = jacobian_fold_penalty(identity_grid(2, 9, 11, dtype=dtype))
        assert out.shape == () and out.dtype == dtype
        assert_close(out, 0.0)

    def test_mild_distortion_is_zero(self):
        params = identity_params(1)
        params[0, 0] = 0.1
        assert_close(jacobian_fold_penalty(brown_conrady_grid(params, 16, 16)), 0.0)

    def test_folded_is_positive(self):
        assert jacobian_fold_penalty(folded_grid()) > 0

    def test_reference_margin(self):
        # Identity has det = 1 in every cell: relu(1.5 - 1) = 0.5.
        assert_close(jacobian_fold_penalty(identity_grid(1, 5, 5, dtype=torch.float64), margin=1.5), 0.5)

    def test_exception(self):
        with pytest.raises(ValueError, match=r"grid must have shape \(B, H, W, 2\), got \(1, 5, 5, 3\)"):
            jacobian_fold_penalty(torch.zeros(1, 5, 5, 3))
        with pytest.raises(ValueError, match=r"H, W >= 2.*got \(1, 1, 5, 2\)"):
            jacobian_fold_penalty(torch.zeros(1, 1, 5, 2))

    def test_gradcheck(self):
        grid = folded_grid(4, 6, dtype=torch.float64)
        grid = grid + 0.01 * torch.randn(grid.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        grid.requires_grad_(True)
        assert torch.autograd.gradcheck(jacobian_fold_penalty, (grid,))


# ----------------------------------------------------------------------------- weights and names

class TestLossWeights:
    def test_defaults(self):
        assert dataclasses.asdict(LossWeights()) == {
            "pixel": 1.0, "ssim": 0.5, "edge": 0.5, "grad_orient": 0.25, "multiscale": 0.5,
            "flow_tv": 0.05, "flow_mag": 0.01, "flow_curv": 0.05, "jacobian": 1.0,
        }

    def test_fields_are_loss_terms(self):
        assert tuple(f.name for f in dataclasses.fields(LossWeights)) == LOSS_TERMS
        assert LOSS_TERMS == IMAGE_TERMS + RESIDUAL_TERMS + ("jacobian",)
        assert RESIDUAL_TERMS == ("flow_tv", "flow_mag", "flow_curv")

    def test_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            LossWeights().pixel = 2.0  # type: ignore[misc]

    def test_exception(self):
        with pytest.raises(ValueError, match="'edge' must be finite and >= 0, got -1.0"):
            LossWeights(edge=-1.0)
        with pytest.raises(ValueError, match="'pixel' must be a number, got bool"):
            LossWeights(pixel=True)


# ----------------------------------------------------------------------------- composite

WEIGHTED_NAMES = tuple(f"{n}_weighted" for n in LOSS_TERMS)


def composite_inputs(seed: int = 0, dtype=torch.float32):
    """pred/target ``(2, 3, 16, 16)``, a random flow ``(2, 2, 4, 4)`` and a folded grid ``(2, 16, 16, 2)``."""
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(2, 3, 16, 16, generator=gen, dtype=dtype)
    target = torch.rand(2, 3, 16, 16, generator=gen, dtype=dtype)
    flow = torch.randn(2, 2, 4, 4, generator=gen, dtype=dtype)
    grid = folded_grid(16, 16, dtype=dtype).expand(2, -1, -1, -1).clone()
    return pred, target, flow, grid


def run_composite(weights=None, *, flow=True, grid=True, residual_terms=True, jacobian_term=True,
                  dtype=torch.float32, requires_grad=False):
    pred, target, f, g = composite_inputs(dtype=dtype)
    if requires_grad:
        for t in (pred, f, g):
            t.requires_grad_(True)
    total, comps = composite_loss(pred, target, weights=weights or LossWeights(),
                                  residual_flow_lowres=f if flow else None, final_grid=g if grid else None,
                                  residual_terms=residual_terms, jacobian_term=jacobian_term)
    return total, comps, (pred, target, f, g)


class TestCompositeLoss:
    def test_keys(self):
        _, comps, _ = run_composite()
        assert set(comps) == set(LOSS_TERMS) | set(WEIGHTED_NAMES)
        assert len(comps) == 2 * len(LOSS_TERMS)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_components_detached_0d(self, dtype):
        total, comps, _ = run_composite(dtype=dtype, requires_grad=True)
        assert total.shape == () and total.dtype == dtype and total.requires_grad
        for name, value in comps.items():
            assert value.shape == (), name
            assert value.dtype == dtype, name
            assert not value.requires_grad, name

    def test_raw_values_match_functions(self):
        _, comps, (pred, target, f, g) = run_composite()
        expected = {
            "pixel": charbonnier(pred, target), "ssim": ssim_loss(pred, target),
            "edge": edge_loss(pred, target), "grad_orient": grad_orient_loss(pred, target),
            "multiscale": multiscale_loss(pred, target), "flow_tv": flow_tv(f), "flow_mag": flow_mag(f),
            "flow_curv": flow_curv(f), "jacobian": jacobian_fold_penalty(g),
        }
        for name, value in expected.items():
            assert_close(comps[name], value)
        assert comps["jacobian"] > 0 and comps["flow_mag"] > 0

    def test_total_is_sum_of_weighted(self):
        total, comps, _ = run_composite()
        assert_close(total.detach(), torch.stack([comps[n] for n in WEIGHTED_NAMES]).sum())

    def test_weights_applied(self):
        weights = LossWeights(pixel=2.0, ssim=0.0, edge=3.0, grad_orient=0.1, multiscale=0.7,
                              flow_tv=0.2, flow_mag=0.3, flow_curv=0.4, jacobian=5.0)
        total, comps, _ = run_composite(weights)
        for name in LOSS_TERMS:
            assert_close(comps[f"{name}_weighted"], getattr(weights, name) * comps[name])
        assert comps["ssim"] > 0 and comps["ssim_weighted"] == 0
        base_total, _, _ = run_composite(LossWeights())
        doubled = LossWeights(**{n: 2 * v for n, v in dataclasses.asdict(LossWeights()).items()})
        double_total, _, _ = run_composite(doubled)
        assert_close(double_total, 2 * base_total)

    @pytest.mark.parametrize("case", ["stage1_flags", "inputs_none"])
    def test_switches_zero_residual_and_jacobian(self, case):
        if case == "stage1_flags":
            total, comps, (pred, target, f, g) = run_composite(residual_terms=False, jacobian_term=False,
                                                               requires_grad=True)
        else:
            total, comps, (pred, target, f, g) = run_composite(flow=False, grid=False, requires_grad=True)
        for name in RESIDUAL_TERMS + ("jacobian",):
            assert comps[name].item() == 0.0 and comps[f"{name}_weighted"].item() == 0.0, name
        image_total = sum(comps[f"{n}_weighted"] for n in IMAGE_TERMS)
        assert_close(total.detach(), image_total)
        total.backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0
        assert f.grad is None and g.grad is None

    def test_each_switch_alone(self):
        _, residual_only, _ = run_composite(jacobian_term=False)
        assert all(residual_only[n] > 0 for n in RESIDUAL_TERMS)
        assert residual_only["jacobian"] == 0
        _, jacobian_only, _ = run_composite(residual_terms=False)
        assert all(jacobian_only[n] == 0 for n in RESIDUAL_TERMS)
        assert jacobian_only["jacobian"] > 0

    def test_gradients_reach_flow_and_grid(self):
        total, _, (pred, _, f, g) = run_composite(requires_grad=True)
        total.backward()
        for t in (pred, f, g):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0

    def test_identity_stage1_matches_trainer_call(self, astronaut):
        # The trainer's identity baseline: residual/jacobian off, equal images -> only the eps floors.
        total, comps = composite_loss(astronaut, astronaut, weights=LossWeights(), residual_flow_lowres=None,
                                      final_grid=None, residual_terms=False, jacobian_term=False)
        assert_close(total, 1.0 * 1e-3 + 0.5 * 1e-3)
        assert_close(comps["ssim"], 0.0)

    def test_exception(self):
        pred, target, flow, grid = composite_inputs()
        kwargs = dict(weights=LossWeights(), residual_terms=True, jacobian_term=True)
        with pytest.raises(ValueError, match=r"expected \(2, 3, 16, 16\).*got \(2, 3, 8, 8\)"):
            composite_loss(pred, target[..., :8, :8], residual_flow_lowres=flow, final_grid=grid, **kwargs)
        with pytest.raises(ValueError, match=r"residual_flow_lowres must have shape \(B, 2, h, w\), got \(2, 3, 4, 4\)"):
            composite_loss(pred, target, residual_flow_lowres=torch.zeros(2, 3, 4, 4), final_grid=grid, **kwargs)
        with pytest.raises(ValueError, match=r"shape \(2, 2, h, w\) to match pred, got \(1, 2, 4, 4\)"):
            composite_loss(pred, target, residual_flow_lowres=flow[:1], final_grid=grid, **kwargs)
        with pytest.raises(ValueError, match=r"final_grid must have shape \(2, 16, 16, 2\) to match pred, "
                                             r"got \(2, 8, 16, 2\)"):
            composite_loss(pred, target, residual_flow_lowres=flow, final_grid=grid[:, :8], **kwargs)
        with pytest.raises(ValueError, match="weights must be a LossWeights, got dict"):
            composite_loss(pred, target, weights={}, residual_flow_lowres=flow, final_grid=grid,
                           residual_terms=True, jacobian_term=True)


# ----------------------------------------------------------------------------- the fast filters

class TestFastFiltersMatchTheirConvolutions:
    """The losses' Sobel (shifted slices) and Gaussian (banded matrix products) are the same sums as the
    3x3 correlation and the depthwise valid convolution they replace; checked in float64 against
    ``F.conv2d``, values and gradients."""

    @staticmethod
    def sobel_by_convolution(gray):
        kx = gray.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        grads = torch.nn.functional.conv2d(torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate"),
                                           torch.stack((kx, kx.t())).unsqueeze(1))
        return grads[:, 0:1], grads[:, 1:2]

    @staticmethod
    def blur_by_convolution(x, window, sigma):
        coords = torch.arange(window, dtype=x.dtype) - (window - 1) / 2.0
        g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
        g = g / g.sum()
        channels = x.shape[1]
        x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, window).expand(channels, 1, 1, window), groups=channels)
        return torch.nn.functional.conv2d(x, g.view(1, 1, window, 1).expand(channels, 1, window, 1), groups=channels)

    @pytest.mark.parametrize("shape", [(2, 1, 9, 13), (1, 1, 3, 3), (3, 1, 32, 20)])
    def test_sobel(self, shape):
        from autohdr.lens.losses import _sobel
        gray = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        fast, slow = _sobel(gray), self.sobel_by_convolution(gray)
        for a, b in zip(fast, slow):
            assert_close(a, b)
        weights = torch.rand((2,) + shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        grad_fast, = torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, fast)), gray)
        grad_slow, = torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, slow)), gray)
        assert_close(grad_fast, grad_slow)

    # the last two: above _BAND_MAX_SIDE in one axis, the convolution path
    @pytest.mark.parametrize("shape,window", [((2, 15, 16, 16), 7), ((1, 3, 7, 11), 7), ((2, 2, 12, 9), 3),
                                              ((1, 2, 200, 9), 7), ((1, 1, 8, 230), 7)])
    def test_gaussian_blur(self, shape, window):
        from autohdr.lens.losses import _gaussian_blur_valid
        x = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
        fast, slow = _gaussian_blur_valid(x, window, 1.5), self.blur_by_convolution(x, window, 1.5)
        assert fast.shape == slow.shape == shape[:2] + (shape[2] - window + 1, shape[3] - window + 1)
        assert_close(fast, slow)
        weights = torch.rand(fast.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        assert_close(torch.autograd.grad((weights * fast).sum(), x)[0], torch.autograd.grad((weights * slow).sum(), x)[0])

    def test_composite_shares_the_gradients_and_equals_the_public_terms(self):
        pred, target, _, _ = composite_inputs(dtype=torch.float64)
        _, comps = composite_loss(pred, target, weights=LossWeights(), residual_flow_lowres=None, final_grid=None,
                                  residual_terms=False, jacobian_term=False)
        assert_close(comps["edge"], edge_loss(pred, target))
        assert_close(comps["grad_orient"], grad_orient_loss(pred, target))
        assert_close(comps["ssim"], ssim_loss(pred, target))
