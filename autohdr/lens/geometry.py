"""Differentiable warp geometry: identity, Brown-Conrady and residual grids, warping, statistics.

Convention (one place for it, used everywhere in the package):
    * Backward warping only: a grid says, for every output pixel, where to sample the input.
    * Grids are ``(B, H, W, 2)`` in ``(x, y)`` order, normalized to ``[-1, 1]`` with
      ``align_corners=True`` (-1 and +1 are the centres of the first and last pixel).
    * Images are ``(B, 3, H, W)`` float in ``[0, 1]``.
    * Lens parameters are ``(B, 8)`` in the canonical order ``[k1, k2, k3, p1, p2, dcx, dcy, s]``,
      expressed in normalized coordinates (so they do not depend on the resolution).
    * A residual flow is ``(B, 2, h, w)`` in pixels of its own low resolution ``(h, w)``.

All functions are pure; new tensors follow the input's device and dtype.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PARAM_NAMES: tuple[str, ...] = ("k1", "k2", "k3", "p1", "p2", "dcx", "dcy", "s")
IDENTITY_PARAMS: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
ALIGN_CORNERS = True


def _check_params(params: torch.Tensor) -> None:
    if not isinstance(params, torch.Tensor):
        raise ValueError(f"params must be a torch.Tensor of shape (B, 8), got {type(params).__name__}")
    if params.ndim != 2 or params.shape[1] != len(PARAM_NAMES):
        raise ValueError(
            f"params must have shape (B, 8) in order {list(PARAM_NAMES)}, got {tuple(params.shape)}"
        )
    if not params.is_floating_point():
        raise ValueError(f"params must be a floating-point tensor, got dtype {params.dtype}")


def check_grid(grid: torch.Tensor, name: str = "grid") -> None:
    """Raise ``ValueError`` unless ``grid`` is a floating ``(B, H, W, 2)`` tensor."""
    if not isinstance(grid, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, W, 2), got {type(grid).__name__}")
    if grid.ndim != 4 or grid.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (B, H, W, 2), got {tuple(grid.shape)}")
    if not grid.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {grid.dtype}")


def check_channels_first(values: torch.Tensor, name: str, channels: int, shape: str,
                         kind: str = "a floating-point tensor") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``values`` is a floating ``(B, channels, H, W)`` tensor."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(values).__name__}")
    if values.ndim != 4 or values.shape[1] != channels:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"{name} must be {kind}, got dtype {values.dtype}")


def check_image(image: torch.Tensor, name: str = "image") -> None:
    """Raise ``ValueError`` unless ``image`` is a floating ``(B, 3, H, W)`` tensor."""
    check_channels_first(image, name, 3, "(B, 3, H, W)", "a floating-point tensor in [0, 1]")


def identity_params(batch: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Parameters of the identity warp, ``(batch, 8)``."""
    return torch.tensor(IDENTITY_PARAMS, device=device, dtype=dtype).expand(batch, -1).clone()


def identity_grid(batch: int, height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity sampling grid, ``(batch, height, width, 2)`` in normalized ``(x, y)``.

    >>> identity_grid(1, 2, 3)[0, 0]
    tensor([[-1., -1.],
            [ 0., -1.],
            [ 1., -1.]])
    """
    if height < 2 or width < 2:
        raise ValueError(f"identity_grid needs height and width >= 2, got ({height}, {width})")
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0).expand(batch, -1, -1, -1).clone()


@functools.lru_cache(maxsize=32)
def _shared_identity_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The identity grid ``(1, H, W, 2)``, built once per size, device and dtype: a reference the
    per-step figures subtract by broadcasting (the same values as a full-batch identity, without
    building and reading one every step). Shared: never written to."""
    return identity_grid(1, height, width, device=device, dtype=dtype)


def _lens_terms(params: torch.Tensor, points: torch.Tensor):
    """The coefficients broadcast over ``points`` (``(B, ..., 2)``), the centred and scaled ``x``,
    ``y``, ``r2 = x^2 + y^2`` and ``radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3``, each ``(B, ...)``."""
    _check_params(params)
    view = (params.shape[0],) + (1,) * (points.ndim - 2)
    k1, k2, k3, p1, p2, dcx, dcy, s = (params[:, i].reshape(view) for i in range(8))
    x = (points[..., 0] - dcx) / s
    y = (points[..., 1] - dcy) / s
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return (k1, k2, k3, p1, p2, dcx, dcy, s), x, y, r2, radial


def brown_conrady_map(params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map output points to source points with the Brown-Conrady model.

    Args:
        params: ``(B, 8)`` as ``[k1, k2, k3, p1, p2, dcx, dcy, s]``.
        points: ``(B, ..., 2)`` normalized ``(x, y)`` output locations.

    Returns:
        ``(B, ..., 2)`` normalized source locations. For ``x = (xo - dcx) / s``,
        ``y = (yo - dcy) / s``, ``r2 = x^2 + y^2``, ``radial = 1 + k1 r2 + k2 r2^2 + k3 r2^3``:
        ``xs = x radial + 2 p1 x y + p2 (r2 + 2 x^2) + dcx`` and
        ``ys = y radial + p1 (r2 + 2 y^2) + 2 p2 x y + dcy``.
    """
    (k1, k2, k3, p1, p2, dcx, dcy, s), x, y, r2, radial = _lens_terms(params, points)
    xs = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x) + dcx
    ys = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y + dcy
    return torch.stack((xs, ys), dim=-1)


def brown_conrady_jacobian(params: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Analytic Jacobian of :func:`brown_conrady_map` w.r.t. the output point.

    Args:
        params: ``(B, 8)``.
        points: ``(B, ..., 2)`` normalized output locations.

    Returns:
        ``(B, ..., 2, 2)`` with ``J[..., i, j] = d source_i / d output_j``.
    """
    (k1, k2, k3, p1, p2, dcx, dcy, s), x, y, r2, radial = _lens_terms(params, points)
    dradial = k1 + r2 * (2.0 * k2 + 3.0 * k3 * r2)
    dxs_dx = radial + 2.0 * x * x * dradial + 2.0 * p1 * y + 6.0 * p2 * x
    dxs_dy = 2.0 * x * y * dradial + 2.0 * p1 * x + 2.0 * p2 * y
    dys_dx = 2.0 * x * y * dradial + 2.0 * p1 * x + 2.0 * p2 * y
    dys_dy = radial + 2.0 * y * y * dradial + 6.0 * p1 * y + 2.0 * p2 * x
    jac = torch.stack((torch.stack((dxs_dx, dxs_dy), -1), torch.stack((dys_dx, dys_dy), -1)), -2)
    return jac / s.unsqueeze(-1).unsqueeze(-1)


def brown_conrady_grid(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Backward sampling grid of the Brown-Conrady model, ``(B, height, width, 2)``.

    All-zero coefficients with ``s = 1`` give exactly :func:`identity_grid`.
    """
    _check_params(params)
    ident = identity_grid(params.shape[0], height, width, device=params.device, dtype=params.dtype)
    return brown_conrady_map(params, ident)


def invert_brown_conrady_grid(
    params: torch.Tensor,
    height: int,
    width: int,
    *,
    residual_fn=None,
    iterations: int = 30,
) -> torch.Tensor:
    """Grid of the inverse mapping, found by Newton fixed-point iteration.

    For every location ``u`` it finds ``x`` with ``map(x) = u`` where
    ``map = brown_conrady_map(params, .) (+ residual_fn(.))``, iterating
    ``x <- x - J(x)^-1 (map(x) - u)`` from ``x = u`` (``J`` is the parametric Jacobian; a small
    smooth residual makes it a quasi-Newton step). Used to *distort* a clean image with known
    parameters: ``warp(clean, inverse)`` is an input that ``brown_conrady_grid(params)`` corrects.

    Args:
        params: ``(B, 8)``.
        residual_fn: optional ``points (B, H, W, 2) -> displacement (B, H, W, 2)``, normalized.

    Returns:
        ``(B, height, width, 2)`` normalized grid. Where the mapping is invertible over the frame
        (positive Jacobian), ``map(result)`` matches the identity grid to well under 0.01 px.
    """
    _check_params(params)
    target = identity_grid(params.shape[0], height, width, device=params.device, dtype=params.dtype)
    x = target.clone()
    for _ in range(iterations):
        mapped = brown_conrady_map(params, x)
        if residual_fn is not None:
            mapped = mapped + residual_fn(x)
        err = mapped - target
        x = x - _solve_2x2(brown_conrady_jacobian(params, x), err)
    return x


def _solve_2x2(jac: torch.Tensor, rhs: torch.Tensor, min_abs_det: float = 1e-6) -> torch.Tensor:
    """Solve ``jac @ step = rhs`` per location in closed form, ``jac (..., 2, 2)``, ``rhs (..., 2)``.

    A (near-)singular Jacobian, met where the mapping folds outside the frame, gets its determinant
    clamped away from zero instead of raising, so the iteration never aborts a whole batch.
    """
    a, b = jac[..., 0, 0], jac[..., 0, 1]
    c, d = jac[..., 1, 0], jac[..., 1, 1]
    det = a * d - b * c
    det = torch.where(det >= 0, det.clamp(min=min_abs_det), det.clamp(max=-min_abs_det))
    ex, ey = rhs[..., 0], rhs[..., 1]
    return torch.stack(((d * ex - b * ey) / det, (a * ey - c * ex) / det), dim=-1)


def residual_to_normalized(residual_flow_lowres: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Upsample a low-resolution residual flow and express it as normalized grid deltas.

    Args:
        residual_flow_lowres: ``(B, 2, h, w)`` displacement in pixels of the ``(h, w)`` grid,
            channel 0 is x, channel 1 is y.

    Returns:
        ``(B, height, width, 2)`` normalized ``(x, y)`` deltas. With ``align_corners=True`` one
        low-resolution pixel spans ``2 / (w - 1)`` (x) and ``2 / (h - 1)`` (y) in normalized units,
        the same physical distance as ``(width - 1) / (w - 1)`` full-resolution pixels.
    """
    if residual_flow_lowres.ndim != 4 or residual_flow_lowres.shape[1] != 2:
        raise ValueError(
            f"residual_flow_lowres must have shape (B, 2, h, w), got {tuple(residual_flow_lowres.shape)}"
        )
    h, w = residual_flow_lowres.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"residual_flow_lowres needs h, w >= 2, got ({h}, {w})")
    scale = residual_flow_lowres.new_tensor([2.0 / (w - 1), 2.0 / (h - 1)]).view(1, 2, 1, 1)
    up = F.interpolate(residual_flow_lowres * scale, size=(height, width), mode="bilinear",
                       align_corners=ALIGN_CORNERS)
    return up.permute(0, 2, 3, 1)


def fuse_grid(param_grid: torch.Tensor, residual_flow_lowres: torch.Tensor | None) -> torch.Tensor:
    """Final grid = parametric grid + upsampled residual delta (``(B, H, W, 2)``)."""
    check_grid(param_grid, "param_grid")
    if residual_flow_lowres is None:
        return param_grid
    _, height, width, _ = param_grid.shape
    return param_grid + residual_to_normalized(residual_flow_lowres, height, width)


def warp(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` ``(B, 3, H_in, W_in)`` at ``grid`` ``(B, H, W, 2)`` -> ``(B, 3, H, W)``.

    Bilinear, zeros outside the frame, ``align_corners=True``.
    """
    check_image(image)
    check_grid(grid)
    if grid.shape[0] != image.shape[0]:
        raise ValueError(f"grid batch {grid.shape[0]} does not match image batch {image.shape[0]}")
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=ALIGN_CORNERS)


@dataclass(frozen=True)
class WarpResult:
    """What one forward warp produces; grids are ``(B, H, W, 2)``, ``prediction`` ``(B, 3, H, W)``."""

    prediction: torch.Tensor
    param_grid: torch.Tensor
    final_grid: torch.Tensor


def apply_correction(image: torch.Tensor, params: torch.Tensor,
                     residual_flow_lowres: torch.Tensor | None) -> WarpResult:
    """Fuse the parametric and residual grids and warp ``image`` once.

    Args:
        image: ``(B, 3, H, W)``.
        params: ``(B, 8)``.
        residual_flow_lowres: ``(B, 2, h, w)`` or ``None`` (residual branch off).
    """
    check_image(image)
    _, _, height, width = image.shape
    param_grid = brown_conrady_grid(params.to(image.dtype), height, width)
    final_grid = fuse_grid(param_grid, residual_flow_lowres)
    return WarpResult(warp(image, final_grid), param_grid, final_grid)


# ----------------------------------------------------------------------------- statistics

def grid_to_pixels(grid_delta: torch.Tensor) -> torch.Tensor:
    """Convert a normalized ``(B, H, W, 2)`` delta to pixel units of that ``(H, W)``."""
    _, height, width, _ = grid_delta.shape
    scale = grid_delta.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])
    return grid_delta * scale


def displacement_px(grid: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel displacement magnitude in pixels, ``(B, H, W)``.

    Measured from ``reference`` (default: the identity grid of the same size). Written as
    ``sqrt(dx^2 + dy^2)`` of the two pixel components: on a CPU ``norm(dim=-1)`` over a last dimension
    of 2 costs 2.5x that (the instrumentation takes three of these per step; values agree to 1 ulp).
    """
    check_grid(grid)
    b, h, w, _ = grid.shape
    if reference is None:
        reference = _shared_identity_grid(h, w, grid.device, grid.dtype)
    delta = grid - reference
    dx = delta[..., 0] * ((w - 1) / 2.0)
    dy = delta[..., 1] * ((h - 1) / 2.0)
    return torch.sqrt(dx * dx + dy * dy)


def summarize(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mean``, ``max`` and ``std`` of a tensor as 0-d tensors (read them once, on the host)."""
    flat = values.detach().reshape(-1).float()
    std = flat.std(unbiased=False) if flat.numel() > 1 else flat.new_zeros(())
    return {"mean": flat.mean(), "max": flat.max(), "std": std}


def out_of_bounds_fraction(grid: torch.Tensor) -> torch.Tensor:
    """Fraction of grid samples outside ``[-1, 1]`` in x or y (0-d tensor)."""
    check_grid(grid)
    outside = (grid[..., 0].abs() > 1.0) | (grid[..., 1].abs() > 1.0)  # 1.5x faster than .any(dim=-1) on CPU
    return outside.float().mean()


def jacobian_determinant(grid: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of the mapping output pixel -> source pixel, ``(B, H-1, W-1)``.

    Forward differences in pixel units on each cell; 1 for the identity, negative where the
    grid folds over itself.
    """
    check_grid(grid)
    pix = grid_to_pixels(grid)
    dx = pix[:, :-1, 1:, :] - pix[:, :-1, :-1, :]  # d/d(x_out)
    dy = pix[:, 1:, :-1, :] - pix[:, :-1, :-1, :]  # d/d(y_out)
    return dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0]


def folded_fraction(grid: torch.Tensor) -> torch.Tensor:
    """Fraction of cells whose Jacobian determinant is negative (0-d tensor)."""
    return (jacobian_determinant(grid) < 0).float().mean()


def grid_statistics(param_grid: torch.Tensor, final_grid: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The instrumentation's geometry figures, as 0-d tensors keyed by metric name.

    ``param_grid_disp_px_*`` and ``final_grid_disp_px_*`` are displacements from identity,
    ``residual_contrib_px_*`` is ``|final - param|`` in pixels, and
    ``residual_to_param_disp_ratio_mean`` is the mean residual contribution over the mean
    parametric displacement (0 when both are 0). ``final_grid=None`` means no residual was fused
    (stage 1): the final grid is the parametric one, and its figures are not computed twice.
    """
    stats: dict[str, torch.Tensor] = {}
    check_grid(param_grid)
    b, h, w, _ = param_grid.shape
    ident = _shared_identity_grid(h, w, param_grid.device, param_grid.dtype)
    param_disp = displacement_px(param_grid, ident)
    if final_grid is None:
        final_grid, final_disp, residual = param_grid, param_disp, torch.zeros_like(param_disp)
    else:
        final_disp = displacement_px(final_grid, ident)
        residual = displacement_px(final_grid, param_grid)
    for prefix, values in (("param_grid_disp_px", param_disp), ("final_grid_disp_px", final_disp),
                           ("residual_contrib_px", residual)):
        for key, value in summarize(values).items():
            stats[f"{prefix}_{key}"] = value
    denom = stats["param_grid_disp_px_mean"]
    stats["residual_to_param_disp_ratio_mean"] = stats["residual_contrib_px_mean"] / denom.clamp_min(1e-6)
    stats["grid_out_of_bounds_frac"] = out_of_bounds_fraction(final_grid.detach())
    stats["grid_folded_frac"] = folded_fraction(final_grid.detach())
    return stats
