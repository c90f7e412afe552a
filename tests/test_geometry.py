"""autohdr.lens.geometry: grids, warps, inverse, statistics (one class per function)."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from autohdr.lens.geometry import (
    apply_correction, brown_conrady_grid, brown_conrady_jacobian, brown_conrady_map, displacement_px, folded_fraction,
    fuse_grid, grid_statistics, grid_to_pixels, identity_grid, identity_params, invert_brown_conrady_grid,
    jacobian_determinant, out_of_bounds_fraction, residual_to_normalized, warp,
)
from autohdr.lens.model import DEFAULT_PARAM_BOUNDS
from tests.tolerances import assert_close


def params_strategy(scale: float = 1.0):
    """Parameters drawn inside the model's default bounds (scaled towards identity by ``scale``)."""
    elements = []
    for (lo, hi), ident in zip(DEFAULT_PARAM_BOUNDS, (0, 0, 0, 0, 0, 0, 0, 1.0)):
        elements.append(st.floats(ident + (lo - ident) * scale, ident + (hi - ident) * scale))
    return st.tuples(*elements).map(lambda t: torch.tensor([t], dtype=torch.float64))


class TestIdentityGrid:
    def test_shape_and_corners(self):
        grid = identity_grid(2, 4, 5)
        assert grid.shape == (2, 4, 5, 2)
        assert_close(grid[0, 0, 0], torch.tensor([-1.0, -1.0]))
        assert_close(grid[1, -1, -1], torch.tensor([1.0, 1.0]))

    def test_follows_dtype(self):
        assert identity_grid(1, 3, 3, dtype=torch.float64).dtype == torch.float64

    def test_too_small_raises(self):
        with pytest.raises(ValueError, match="height and width >= 2"):
            identity_grid(1, 1, 4)


class TestBrownConradyGrid:
    @given(batch=st.integers(1, 3), height=st.integers(2, 12), width=st.integers(2, 12))
    @settings(max_examples=20, deadline=None)
    def test_identity_params_give_identity_grid(self, batch, height, width):
        grid = brown_conrady_grid(identity_params(batch), height, width)
        torch.testing.assert_close(grid, identity_grid(batch, height, width), atol=1e-6, rtol=0)

    def test_reference_value(self):
        # Hand computation: k1 = 0.1 at the corner (1, 1): r2 = 2, radial = 1.2 -> source (1.2, 1.2).
        params = torch.tensor([[0.1, 0, 0, 0, 0, 0, 0, 1.0]])
        grid = brown_conrady_grid(params, 3, 3)
        assert_close(grid[0, -1, -1], torch.tensor([1.2, 1.2]))
        assert_close(grid[0, 1, 1], torch.tensor([0.0, 0.0]))

    def test_tangential_and_centre_terms(self):
        # p1 = 0.01 at (x, y) = (1, 0): xs = 1 + 0, ys = p1 * (r2 + 2 y^2) = 0.01; dcx shifts both ways.
        params = torch.tensor([[0, 0, 0, 0.01, 0, 0, 0, 1.0]])
        assert_close(brown_conrady_map(params, torch.tensor([[[1.0, 0.0]]]))[0, 0], torch.tensor([1.0, 0.01]))
        shifted = torch.tensor([[0, 0, 0, 0, 0, 0.05, 0, 1.0]])
        assert_close(brown_conrady_map(shifted, torch.tensor([[[0.3, 0.2]]]))[0, 0], torch.tensor([0.3, 0.2]))

    @pytest.mark.parametrize("shape", [(8,), (2, 7), (1, 2, 8)])
    def test_bad_params_shape_raises(self, shape):
        with pytest.raises(ValueError, match=r"shape \(B, 8\).*got"):
            brown_conrady_grid(torch.zeros(shape), 4, 4)

    def test_integer_params_raise(self):
        with pytest.raises(ValueError, match="floating-point"):
            brown_conrady_grid(torch.zeros(1, 8, dtype=torch.int64), 4, 4)

    def test_gradcheck_coefficients(self):
        params = torch.tensor([[0.1, 0.02, 0.01, 0.005, -0.004, 0.01, -0.02, 1.03]], dtype=torch.float64,
                              requires_grad=True)
        assert torch.autograd.gradcheck(lambda p: brown_conrady_grid(p, 4, 5), (params,))

    def test_analytic_jacobian_matches_autograd(self):
        params = torch.tensor([[0.2, -0.05, 0.02, 0.01, -0.01, 0.03, -0.02, 1.05]], dtype=torch.float64)
        point = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
        auto = torch.autograd.functional.jacobian(lambda q: brown_conrady_map(params, q.view(1, 1, 2))[0, 0], point)
        assert_close(brown_conrady_jacobian(params, point.view(1, 1, 2))[0, 0], auto.view(2, 2))


class TestInverse:
    @given(params=params_strategy(scale=0.5))
    @settings(max_examples=25, deadline=None)
    def test_round_trip_under_0_01_px(self, params):
        height, width = 48, 64
        # The inverse exists over the frame only when the forward map is one-to-one on a region
        # around the frame (positive Jacobian) and that region's image covers the whole frame.
        region = 1.6 * identity_grid(1, height, width, dtype=torch.float64)
        jac = brown_conrady_jacobian(params, region)
        assume(bool((torch.linalg.det(jac) > 0.05).all()))
        boundary = torch.cat((region[:, 0], region[:, -1], region[:, :, 0], region[:, :, -1]), dim=1)
        assume(bool((brown_conrady_map(params, boundary.unsqueeze(1)).abs().amax(-1) > 1.0).all()))
        inverse = invert_brown_conrady_grid(params, height, width)
        back = brown_conrady_map(params, inverse)
        error_px = grid_to_pixels(back - identity_grid(1, height, width, dtype=torch.float64)).norm(dim=-1)
        assert float(error_px.max()) < 0.01

    def test_round_trip_at_strong_barrel(self):
        params = torch.tensor([[0.35, 0.08, 0.02, 0.01, -0.01, 0.03, 0.03, 1.05]], dtype=torch.float64)
        inverse = invert_brown_conrady_grid(params, 64, 64)
        back = brown_conrady_map(params, inverse)
        assert float(grid_to_pixels(back - identity_grid(1, 64, 64, dtype=torch.float64)).abs().max()) < 0.01

    def test_residual_fn_is_inverted_too(self):
        params = torch.tensor([[0.2, 0, 0, 0, 0, 0, 0, 1.0]], dtype=torch.float64)

        def bump(points):
            return 0.02 * torch.exp(-(points ** 2).sum(-1, keepdim=True) / 0.1).expand_as(points)

        inverse = invert_brown_conrady_grid(params, 32, 32, residual_fn=bump)
        back = brown_conrady_map(params, inverse) + bump(inverse)
        assert float(grid_to_pixels(back - identity_grid(1, 32, 32, dtype=torch.float64)).abs().max()) < 0.01


class TestWarp:
    @given(seed=st.integers(0, 10_000), height=st.integers(2, 16), width=st.integers(2, 16))
    @settings(max_examples=20, deadline=None)
    def test_identity_grid_returns_image(self, seed, height, width):
        image = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(warp(image, identity_grid(2, height, width)), image, atol=1e-5, rtol=0)

    def test_shift_by_one_pixel(self):
        image = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
        grid = identity_grid(1, 4, 4)
        grid[..., 0] += 2.0 / 3.0  # one pixel to the right
        out = warp(image, grid)
        assert_close(out[0, 0, :, :3], image[0, 0, :, 1:])
        assert_close(out[0, 0, :, 3], torch.zeros(4))  # zeros outside the frame

    @pytest.mark.parametrize("shape,match", [((3, 8, 8), r"\(B, 3, H, W\), got \(3, 8, 8\)"),
                                             ((1, 1, 8, 8), r"\(B, 3, H, W\), got \(1, 1, 8, 8\)"),
                                             ((1, 4, 8, 8), r"got \(1, 4, 8, 8\)")])
    def test_bad_image_raises(self, shape, match):
        with pytest.raises(ValueError, match=match):
            warp(torch.rand(shape), identity_grid(1, 8, 8))

    def test_integer_image_raises(self):
        with pytest.raises(ValueError, match="floating-point"):
            warp(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), identity_grid(1, 4, 4))

    def test_bad_grid_raises(self):
        with pytest.raises(ValueError, match=r"\(B, H, W, 2\), got \(1, 8, 8, 3\)"):
            warp(torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, 3))

    def test_batch_mismatch_raises(self):
        with pytest.raises(ValueError, match="batch 2 does not match image batch 1"):
            warp(torch.rand(1, 3, 8, 8), identity_grid(2, 8, 8))


class TestResidualFusion:
    def test_units(self):
        # One low-res pixel right at (h, w) = (5, 5) is 2 / 4 normalized = (W - 1) / 4 full-res pixels.
        flow = torch.zeros(1, 2, 5, 5)
        flow[:, 0] = 1.0
        delta = residual_to_normalized(flow, 17, 17)
        assert_close(delta[..., 0], torch.full((1, 17, 17), 0.5))
        assert_close(grid_to_pixels(delta)[..., 0], torch.full((1, 17, 17), 4.0))

    def test_fuse_adds(self):
        base = identity_grid(1, 8, 8)
        flow = torch.randn(1, 2, 4, 4)
        assert_close(fuse_grid(base, flow) - base, residual_to_normalized(flow, 8, 8))
        assert fuse_grid(base, None) is base

    def test_bad_flow_raises(self):
        with pytest.raises(ValueError, match=r"\(B, 2, h, w\), got \(1, 3, 4, 4\)"):
            residual_to_normalized(torch.zeros(1, 3, 4, 4), 8, 8)

    def test_apply_correction_warps_once(self):
        image = torch.rand(2, 3, 16, 16)
        params = identity_params(2)
        flow = torch.zeros(2, 2, 4, 4)
        result = apply_correction(image, params, flow)
        torch.testing.assert_close(result.prediction, image, atol=1e-5, rtol=0)
        assert result.final_grid.shape == (2, 16, 16, 2)


class TestStatistics:
    def test_identity_has_jacobian_one_and_no_displacement(self):
        grid = identity_grid(2, 6, 7)
        assert_close(jacobian_determinant(grid), torch.ones(2, 5, 6))
        assert float(displacement_px(grid).abs().max()) == 0.0
        assert float(folded_fraction(grid)) == 0.0

    def test_folded_grid_detected(self):
        grid = identity_grid(1, 8, 8)
        grid[:, :, 4:, 0] = -grid[:, :, 4:, 0]  # mirror the right half: the mapping folds
        assert float(folded_fraction(grid)) > 0.0
        assert float(jacobian_determinant(grid).min()) < 0.0

    def test_constant_shift_statistics(self):
        grid = identity_grid(1, 9, 9)
        grid[..., 0] += 0.25  # 0.25 * (9 - 1) / 2 = 1 px
        disp = displacement_px(grid)
        assert_close(disp, torch.ones_like(disp))
        assert 0.0 < float(out_of_bounds_fraction(grid)) < 1.0

    def test_grid_statistics_names_and_residual_ratio(self):
        param_grid = identity_grid(1, 9, 9)
        param_grid[..., 0] += 0.5  # 2 px
        final = param_grid.clone()
        final[..., 1] += 0.25  # 1 px residual
        stats = grid_statistics(param_grid, final)
        for prefix in ("param_grid_disp_px", "final_grid_disp_px", "residual_contrib_px"):
            for suffix in ("mean", "max", "std"):
                assert f"{prefix}_{suffix}" in stats
        assert math.isclose(float(stats["param_grid_disp_px_mean"]), 2.0, rel_tol=1e-5)
        assert math.isclose(float(stats["residual_contrib_px_mean"]), 1.0, rel_tol=1e-5)
        assert math.isclose(float(stats["residual_to_param_disp_ratio_mean"]), 0.5, rel_tol=1e-5)
        assert math.isclose(float(stats["final_grid_disp_px_mean"]), math.sqrt(5.0), rel_tol=1e-5)

    def test_grid_statistics_without_residual_equal_those_of_an_equal_copy(self):
        """Stage 1 passes no final grid (nothing fused): the shortcut changes no figure."""
        param_grid = brown_conrady_grid(torch.tensor([[0.2, 0.05, 0.0, 0.01, -0.01, 0.02, 0.0, 1.05]] * 2), 12, 16)
        shortcut, full = grid_statistics(param_grid, None), grid_statistics(param_grid, param_grid.clone())
        assert shortcut.keys() == full.keys()
        for name in full:
            assert_close(shortcut[name], full[name])
        assert float(shortcut["residual_contrib_px_max"]) == 0.0
        assert float(shortcut["final_grid_disp_px_mean"]) > 0.5  # a real lens, not the identity


class TestDisplacementPx:
    def test_equals_the_norm_of_the_pixel_delta(self):
        gen = torch.Generator().manual_seed(5)
        grid = identity_grid(2, 9, 13, dtype=torch.float64) + 0.05 * torch.randn(2, 9, 13, 2, generator=gen,
                                                                                    dtype=torch.float64)
        reference = identity_grid(2, 9, 13, dtype=torch.float64)
        expected = grid_to_pixels(grid - reference).norm(dim=-1)
        torch.testing.assert_close(displacement_px(grid), expected, rtol=1e-12, atol=1e-12)

    def test_a_three_four_shift_is_five_pixels(self):
        grid = identity_grid(1, 5, 7, dtype=torch.float64)  # pixel steps: 2/6 in x, 2/4 in y
        shifted = grid + torch.tensor([3 * 2 / 6, 4 * 2 / 4], dtype=torch.float64)
        torch.testing.assert_close(displacement_px(shifted, grid), torch.full((1, 5, 7), 5.0, dtype=torch.float64))


class TestPerStepShortcuts:
    """The instrumentation's per-step shortcuts give exactly the figures of their plain definitions."""

    def test_out_of_bounds_counts_a_sample_outside_in_x_or_in_y_once(self):
        grid = identity_grid(1, 2, 3).clone()
        grid[0, 0, 0] = torch.tensor([1.5, 0.0])   # outside in x only
        grid[0, 0, 1] = torch.tensor([0.0, -1.2])  # in y only
        grid[0, 0, 2] = torch.tensor([2.0, 2.0])   # in both: one sample
        grid[0, 1, 0] = torch.tensor([1.0, -1.0])  # on the border: inside
        plain = (grid.abs() > 1.0).any(dim=-1).float().mean()
        assert float(out_of_bounds_fraction(grid)) == float(plain) == 3 / 6

    def test_displacement_from_the_shared_identity_equals_a_full_batch_identity(self):
        gen = torch.Generator().manual_seed(3)
        for dtype in (torch.float32, torch.float64):
            grid = identity_grid(3, 10, 12, dtype=dtype) + 0.03 * torch.randn(3, 10, 12, 2, generator=gen, dtype=dtype)
            assert torch.equal(displacement_px(grid), displacement_px(grid, identity_grid(3, 10, 12, dtype=dtype)))
        # the shared reference is left as it was by every caller
        assert torch.equal(displacement_px(identity_grid(2, 10, 12)), torch.zeros(2, 10, 12))
