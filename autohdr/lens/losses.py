"""Differentiable training losses: image terms, residual-flow regularizers and the fold penalty.

Convention (see :mod:`autohdr.lens.geometry`): images are ``(B, 3, H, W)`` float in ``[0, 1]``; grids are
``(B, H, W, 2)`` normalized ``(x, y)`` with ``align_corners=True``; the residual flow is
``(B, 2, h, w)`` in pixels of its own low resolution. Every loss is a pure function that returns a
0-d tensor (the mean over the batch and over pixels) on the input's device and in its dtype.

Image terms (``pred`` = warped input, ``target`` = clean image):

* ``pixel`` -- :func:`charbonnier`, ``mean(sqrt((pred - target)^2 + eps^2))``: a smooth L1. Equal
  images give exactly ``eps``.
* ``ssim`` -- :func:`ssim_loss`, ``1 - SSIM`` with a Gaussian window per colour channel; range
  ``[0, 2]``, 0 for equal images.
* ``edge`` -- :func:`edge_loss`, L1 between the Sobel gradient magnitudes of the luminances:
  edges in the right place with the right strength.
* ``grad_orient`` -- :func:`grad_orient_loss`, ``1 -`` the magnitude-weighted mean of
  ``cos(2 * angle difference)`` between the Sobel gradients; ``2 * angle`` makes it blind to edge
  polarity, so it measures whether lines run in the same direction (straight lines stay straight).
  Computed from the dot and cross products of the gradient vectors, never ``atan2``, so it is
  smooth everywhere. Range ``[0, 2]``.
* ``multiscale`` -- :func:`multiscale_loss`, Charbonnier on average-pooled copies: a coarse signal
  that still points the right way when the warp is far off.

Residual-flow regularizers (on the low-resolution flow, units of low-resolution pixels):

* ``flow_tv`` -- :func:`flow_tv`, mean absolute first difference: piecewise-constant flow.
* ``flow_mag`` -- :func:`flow_mag`, mean squared displacement magnitude: the residual stays small
  and the parametric model explains what it can.
* ``flow_curv`` -- :func:`flow_curv`, mean absolute second difference: smooth (locally affine) flow.

Grid term:

* ``jacobian`` -- :func:`jacobian_fold_penalty`, ``mean(relu(margin - det J))`` of the final grid's
  Jacobian determinant (:func:`autohdr.lens.geometry.jacobian_determinant`): 0 for any warp that does
  not fold (identity has ``det = 1``).

Stage toggles (:func:`composite_loss`): stage 1 (``stage1_param_only``) trains the parametric head
alone, so ``residual_terms=False`` and ``jacobian_term=False`` and those terms are exact zeros;
stages 2 and 3 (``stage2_hybrid``, ``stage3_finetune``) fuse the residual flow into the grid and
switch both on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from autohdr.lens.geometry import check_channels_first, check_grid, check_image, jacobian_determinant

IMAGE_TERMS: tuple[str, ...] = ("pixel", "ssim", "edge", "grad_orient", "multiscale")
RESIDUAL_TERMS: tuple[str, ...] = ("flow_tv", "flow_mag", "flow_curv")
LOSS_TERMS: tuple[str, ...] = IMAGE_TERMS + RESIDUAL_TERMS + ("jacobian",)

# ITU-R BT.601 luma weights, used wherever a term works on luminance.
_LUMA = (0.299, 0.587, 0.114)
_GRADIENT_EPS = 1e-6  # smoothing of the Sobel magnitudes in edge_loss and grad_orient_loss
_SSIM_C1 = 0.01 ** 2
_SSIM_C2 = 0.03 ** 2
_SSIM_SIGMA = 1.5


@dataclass(frozen=True)
class LossWeights:
    """Weight of each term in :func:`composite_loss`; one field per name in ``LOSS_TERMS``."""

    pixel: float = 1.0         # Charbonnier on the full-resolution image
    ssim: float = 0.5          # 1 - SSIM (Gaussian window, per channel)
    edge: float = 0.5          # L1 between Sobel gradient magnitudes (luminance)
    grad_orient: float = 0.25  # 1 - magnitude-weighted cos(2 * gradient angle difference)
    multiscale: float = 0.5    # Charbonnier at average-pooled scales
    flow_tv: float = 0.05      # residual flow: mean |first difference| (stages 2/3)
    flow_mag: float = 0.01     # residual flow: mean squared magnitude (stages 2/3)
    flow_curv: float = 0.05    # residual flow: mean |second difference| (stages 2/3)
    jacobian: float = 1.0      # final grid: mean relu(-det J), the fold penalty (stages 2/3)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"loss weight {f.name!r} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"loss weight {f.name!r} must be finite and >= 0, got {value}")


# ----------------------------------------------------------------------------- checks

def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    """``pred`` and ``target`` must both be floating ``(B, 3, H, W)`` of the same shape."""
    check_image(pred, "pred")
    check_image(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape (B, 3, H, W): expected {tuple(pred.shape)} "
            f"(pred), got {tuple(target.shape)} (target)"
        )


def _check_flow(flow: torch.Tensor, name: str = "residual_flow_lowres") -> None:
    """``flow`` must be a floating ``(B, 2, h, w)`` tensor."""
    check_channels_first(flow, name, 2, "(B, 2, h, w)")


# ----------------------------------------------------------------------------- helpers

def _luminance(image: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of ``(B, 3, H, W)`` -> ``(B, 1, H, W)``."""
    weights = image.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (image * weights).sum(dim=1, keepdim=True)


def _sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives of ``(B, 1, H, W)`` -> ``(gx, gy)``, each ``(B, 1, H, W)``.

    Kernels are normalized by 8 (a unit step gives 0.5) and the border is replicated, so a flat
    image has zero gradient up to the edge. Computed as the separable difference ``[-1, 0, 1]`` and
    smoothing ``[1, 2, 1]`` on shifted slices (the same sums as the 3x3 correlation, in another
    order): on a CPU a 1-channel 3x3 convolution's backward pass costs ~4x these slices'.
    """
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")  # (B, 1, H + 2, W + 2)
    diff_x = padded[..., :, 2:] - padded[..., :, :-2]  # (B, 1, H + 2, W)
    diff_y = padded[..., 2:, :] - padded[..., :-2, :]  # (B, 1, H, W + 2)
    gx = (diff_x[..., :-2, :] + 2.0 * diff_x[..., 1:-1, :] + diff_x[..., 2:, :]) / 8.0
    gy = (diff_y[..., :, :-2] + 2.0 * diff_y[..., :, 1:-1] + diff_y[..., :, 2:]) / 8.0
    return gx, gy


@functools.lru_cache(maxsize=16)
def _gaussian_band(size: int, window: int, sigma: float, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``(size - window + 1, size)`` banded matrix whose row ``i`` holds the normalized 1-D Gaussian at
    columns ``i .. i + window - 1``: ``band @ x`` is the valid Gaussian filter of ``x``'s rows."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    g = (g / g.sum()).to(dtype)
    band = torch.zeros(size - window + 1, size, dtype=dtype)
    for row in range(size - window + 1):
        band[row, row:row + window] = g
    return band.to(device)


#: Largest image side filtered by banded matrix products; larger images use depthwise convolutions. A
#: product costs ~side multiply-adds per output against the convolution's ~window: measured fwd + bwd on
#: one CPU thread (9 channels, ~131k pixels a side^2 batch), the products are faster up to 192 px
#: (64 px: 8.3 vs 19.5 ms, 128: 11.4 vs 15.2, 192: 12.6 vs 13.5) and slower from 256 (21.4 vs 16.9, 512: 72.7 vs 61.4).
_BAND_MAX_SIDE = 192


def _gaussian_blur_valid(x: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """Valid 2-D Gaussian filter of each channel of ``(B, C, H, W)`` -> ``(B, C, H - window + 1, W - window + 1)``.

    The Gaussian is separable: a column pass and a row pass. Up to :data:`_BAND_MAX_SIDE` each pass is a
    product with a banded matrix (``band_h @ x @ band_w.T``: batched matrix products run forward and
    backward at BLAS speed, where a small depthwise convolution's CPU backward pass is slow; SSIM term at
    128x128: 23 -> 16 ms per step with the target's statistics out of the graph, see :func:`ssim_loss`);
    above it, a depthwise row convolution and a column convolution. The same sums either way.
    """
    height, width = x.shape[-2:]
    if max(height, width) <= _BAND_MAX_SIDE:
        band_h = _gaussian_band(height, window, float(sigma), x.dtype, x.device)
        band_w = _gaussian_band(width, window, float(sigma), x.dtype, x.device)
        return band_h @ x @ band_w.t()
    coords = torch.arange(window, device=x.device, dtype=x.dtype) - (window - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    channels = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, window).expand(channels, 1, 1, window), groups=channels)
    return F.conv2d(x, g.view(1, 1, window, 1).expand(channels, 1, window, 1), groups=channels)


# ----------------------------------------------------------------------------- image terms

def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier (smooth L1) loss ``mean(sqrt((pred - target)^2 + eps^2))``.

    Args:
        pred: ``(B, 3, H, W)``.
        target: ``(B, 3, H, W)``, same shape.
        eps: smoothing, ``> 0``; equal images give exactly ``eps``.

    Returns:
        0-d tensor.
    """
    _check_pair(pred, target)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    diff = pred - target
    return torch.sqrt(diff * diff + eps * eps).mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, window: int = 7) -> torch.Tensor:
    """``1 - SSIM`` with a Gaussian window (sigma 1.5), per colour channel, valid convolution.

    ``C1 = 0.01^2`` and ``C2 = 0.03^2`` (dynamic range 1). The SSIM map is averaged over channels
    and the ``(H - window + 1, W - window + 1)`` valid positions.

    Args:
        pred: ``(B, 3, H, W)`` in ``[0, 1]``.
        target: ``(B, 3, H, W)``, same shape.
        window: odd window side, ``>= 3`` and ``<= min(H, W)``.

    Returns:
        0-d tensor in ``[0, 2]``; 0 for equal images.
    """
    _check_pair(pred, target)
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 3, got {window!r}")
    height, width = pred.shape[-2:]
    if height < window or width < window:
        raise ValueError(f"ssim_loss needs H, W >= window={window}, got (H, W) = ({height}, {width})")
    # The prediction's statistics and the target's apart: only the first need a backward pass.
    with_pred = torch.cat((pred, pred * pred, pred * target), dim=1)  # (B, 9, H, W)
    target_only = torch.cat((target, target * target), dim=1)  # (B, 6, H, W)
    mu_p, e_pp, e_pt = _gaussian_blur_valid(with_pred, window, _SSIM_SIGMA).chunk(3, dim=1)
    mu_t, e_tt = _gaussian_blur_valid(target_only, window, _SSIM_SIGMA).chunk(2, dim=1)
    mu_pp, mu_tt, mu_pt = mu_p * mu_p, mu_t * mu_t, mu_p * mu_t
    var_p = e_pp - mu_pp
    var_t = e_tt - mu_tt
    cov = e_pt - mu_pt
    ssim_map = ((2.0 * mu_pt + _SSIM_C1) * (2.0 * cov + _SSIM_C2)) / (
        (mu_pp + mu_tt + _SSIM_C1) * (var_p + var_t + _SSIM_C2)
    )
    return 1.0 - ssim_map.mean()


def edge_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = _GRADIENT_EPS) -> torch.Tensor:
    """L1 between Sobel gradient magnitudes of the luminances.

    The magnitude is ``sqrt(gx^2 + gy^2 + eps^2)`` so it is differentiable on flat regions.

    Args:
        pred: ``(B, 3, H, W)``.
        target: ``(B, 3, H, W)``, same shape.
        eps: smoothing of the magnitude, ``> 0``.

    Returns:
        0-d tensor; 0 for equal images.
    """
    _check_pair(pred, target)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return _edge_of(_sobel(_luminance(pred)), _sobel(_luminance(target)), eps)


def _edge_of(pred_grads: tuple[torch.Tensor, torch.Tensor], target_grads: tuple[torch.Tensor, torch.Tensor],
             eps: float) -> torch.Tensor:
    """:func:`edge_loss` from the Sobel ``(gx, gy)`` of both luminances, each ``(B, 1, H, W)``."""
    gx_p, gy_p = pred_grads
    gx_t, gy_t = target_grads
    mag_p = torch.sqrt(gx_p * gx_p + gy_p * gy_p + eps * eps)
    mag_t = torch.sqrt(gx_t * gx_t + gy_t * gy_t + eps * eps)
    return (mag_p - mag_t).abs().mean()


def grad_orient_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = _GRADIENT_EPS) -> torch.Tensor:
    """``1 -`` magnitude-weighted mean of ``cos(2 * (theta_pred - theta_target))`` of Sobel gradients.

    With ``p``, ``t`` the luminance gradient vectors at a pixel, ``d = p . t`` and
    ``c = p x t``: ``cos(2 dtheta) = (d^2 - c^2) / (d^2 + c^2)`` and ``d^2 + c^2 = |p|^2 |t|^2``, so
    no angle (no ``atan2``) is ever formed. Each pixel is weighted by
    ``w = |p|^2 |t|^2 / m`` with ``m = sqrt(|p|^2 |t|^2 + eps^2)`` (``w ~ |p| |t|`` on edges,
    ``-> 0`` smoothly on flat regions), which gives per image

        ``loss = 1 - sum((d^2 - c^2) / m) / sum((d^2 + c^2) / m) = 2 sum(c^2 / m) / sum(|p|^2 |t|^2 / m)``,

    smooth everywhere and exactly 0 for equal images. The denominator is floored at ``eps^2`` so an
    image pair with no gradient at all contributes 0. Averaged over the batch.

    Args:
        pred: ``(B, 3, H, W)``.
        target: ``(B, 3, H, W)``, same shape.
        eps: smoothing of the ``|p| |t|`` weight, ``> 0``.

    Returns:
        0-d tensor in ``[0, 2]``.
    """
    _check_pair(pred, target)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return _orientation_of(_sobel(_luminance(pred)), _sobel(_luminance(target)), eps)


def _orientation_of(pred_grads: tuple[torch.Tensor, torch.Tensor], target_grads: tuple[torch.Tensor, torch.Tensor],
                    eps: float) -> torch.Tensor:
    """:func:`grad_orient_loss` from the Sobel ``(gx, gy)`` of both luminances, each ``(B, 1, H, W)``."""
    px, py = pred_grads
    tx, ty = target_grads
    dot = px * tx + py * ty
    cross = px * ty - py * tx
    dot2, cross2 = dot * dot, cross * cross
    m = torch.sqrt(dot2 + cross2 + eps * eps)
    num = (2.0 * cross2 / m).flatten(1).sum(dim=1)
    den = ((dot2 + cross2) / m).flatten(1).sum(dim=1)
    return (num / den.clamp_min(eps * eps)).mean()


def multiscale_loss(pred: torch.Tensor, target: torch.Tensor, scales: tuple[int, ...] = (2, 4),
                    eps: float = 1e-3) -> torch.Tensor:
    """Mean over ``scales`` of :func:`charbonnier` on ``s x s`` average-pooled images.

    Pooling is ``avg_pool2d(kernel=s, stride=s)`` (a trailing remainder of rows/columns is dropped).

    Args:
        pred: ``(B, 3, H, W)``.
        target: ``(B, 3, H, W)``, same shape.
        scales: non-empty tuple of ints, each ``>= 1`` and ``<= min(H, W)``.
        eps: Charbonnier smoothing.

    Returns:
        0-d tensor; ``eps`` for equal images.
    """
    _check_pair(pred, target)
    scales = tuple(scales)
    height, width = pred.shape[-2:]
    if not scales:
        raise ValueError("scales must be a non-empty tuple of ints >= 1, got ()")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s > min(height, width):
            raise ValueError(
                f"each scale must be an int in [1, min(H, W)={min(height, width)}], got {s!r} in {scales}"
            )
    total = pred.new_zeros(())
    for s in scales:
        total = total + charbonnier(F.avg_pool2d(pred, s, s), F.avg_pool2d(target, s, s), eps)
    return total / len(scales)


# ----------------------------------------------------------------------------- residual flow terms

def _mean_of(terms: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Mean of 0-d ``terms``; a zero 0-d tensor like ``like`` when there are none."""
    if not terms:
        return like.new_zeros(())
    return torch.stack(terms).mean()


def flow_tv(flow: torch.Tensor) -> torch.Tensor:
    """Total variation of a low-resolution flow: mean ``|first difference|``, x and y averaged.

    Args:
        flow: ``(B, 2, h, w)`` in low-resolution pixels.

    Returns:
        0-d tensor, ``(mean |f[.., :, 1:] - f[.., :, :-1]| + mean |f[.., 1:, :] - f[.., :-1, :]|) / 2``;
        0 for a constant flow. An axis with fewer than 2 samples contributes nothing.
    """
    _check_flow(flow, "flow")
    terms = []
    if flow.shape[-1] >= 2:
        terms.append((flow[..., :, 1:] - flow[..., :, :-1]).abs().mean())
    if flow.shape[-2] >= 2:
        terms.append((flow[..., 1:, :] - flow[..., :-1, :]).abs().mean())
    return _mean_of(terms, flow)


def flow_mag(flow: torch.Tensor) -> torch.Tensor:
    """Mean SQUARED displacement magnitude ``mean(fx^2 + fy^2)`` of a low-resolution flow.

    Squared (not the plain magnitude) so it is smooth at zero flow.

    Args:
        flow: ``(B, 2, h, w)`` in low-resolution pixels.

    Returns:
        0-d tensor in low-resolution pixels squared; 0 only for the zero flow.
    """
    _check_flow(flow, "flow")
    return (flow * flow).sum(dim=1).mean()


def flow_curv(flow: torch.Tensor) -> torch.Tensor:
    """Curvature of a low-resolution flow: mean ``|second difference|`` along x and y, averaged.

    Uses ``f[i+1] - 2 f[i] + f[i-1]`` on each axis (the two halves of the discrete Laplacian,
    kept apart so they cannot cancel), hence 0 for any flow that is affine in ``(x, y)``.

    Args:
        flow: ``(B, 2, h, w)`` in low-resolution pixels.

    Returns:
        0-d tensor. An axis with fewer than 3 samples contributes nothing.
    """
    _check_flow(flow, "flow")
    terms = []
    if flow.shape[-1] >= 3:
        terms.append((flow[..., :, 2:] - 2.0 * flow[..., :, 1:-1] + flow[..., :, :-2]).abs().mean())
    if flow.shape[-2] >= 3:
        terms.append((flow[..., 2:, :] - 2.0 * flow[..., 1:-1, :] + flow[..., :-2, :]).abs().mean())
    return _mean_of(terms, flow)


# ----------------------------------------------------------------------------- grid term

def jacobian_fold_penalty(grid: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Fold penalty ``mean(relu(margin - det J))`` over the grid's cells.

    ``det J`` is :func:`autohdr.lens.geometry.jacobian_determinant` (pixel units, 1 for the identity,
    negative where the grid folds). With ``margin = 0`` only folds are penalized.

    Args:
        grid: ``(B, H, W, 2)`` normalized ``(x, y)``, ``H, W >= 2``.
        margin: determinant below which cells are penalized.

    Returns:
        0-d tensor; 0 for the identity grid.
    """
    check_grid(grid)
    if grid.shape[1] < 2 or grid.shape[2] < 2:
        raise ValueError(f"grid must have H, W >= 2 in (B, H, W, 2), got {tuple(grid.shape)}")
    return F.relu(margin - jacobian_determinant(grid)).mean()


# ----------------------------------------------------------------------------- composite

def composite_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: LossWeights,
    residual_flow_lowres: torch.Tensor | None,
    final_grid: torch.Tensor | None,
    residual_terms: bool,
    jacobian_term: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every term, and the per-term values for logging.

    Args:
        pred: ``(B, 3, H, W)`` warped input.
        target: ``(B, 3, H, W)`` clean image, same shape.
        weights: one weight per term.
        residual_flow_lowres: ``(B, 2, h, w)`` or ``None``.
        final_grid: ``(B, H, W, 2)`` (same ``B, H, W`` as ``pred``) or ``None``.
        residual_terms: count ``flow_tv``, ``flow_mag``, ``flow_curv`` (stages 2/3).
        jacobian_term: count ``jacobian`` (stages 2/3).

    Returns:
        ``(total, components)``: ``total`` is a 0-d tensor in ``pred``'s dtype that keeps the graph;
        ``components`` maps every name in ``LOSS_TERMS`` to its raw value and ``<name>_weighted``
        to ``weight * raw``, all detached 0-d tensors (read them on the host once, not per term).
        A term that is switched off (flag False or its input ``None``) is an exact zero, raw and
        weighted, and adds nothing to ``total``.
    """
    _check_pair(pred, target)
    if not isinstance(weights, LossWeights):
        raise ValueError(f"weights must be a LossWeights, got {type(weights).__name__}")
    batch, _, height, width = pred.shape
    if residual_flow_lowres is not None:
        _check_flow(residual_flow_lowres)
        if residual_flow_lowres.shape[0] != batch:
            raise ValueError(
                f"residual_flow_lowres must have shape ({batch}, 2, h, w) to match pred, "
                f"got {tuple(residual_flow_lowres.shape)}"
            )
    if final_grid is not None:
        check_grid(final_grid, "final_grid")
        if tuple(final_grid.shape) != (batch, height, width, 2):
            raise ValueError(
                f"final_grid must have shape {(batch, height, width, 2)} to match pred, "
                f"got {tuple(final_grid.shape)}"
            )

    # edge and grad_orient read the same Sobel gradients: computed once (their default eps)
    pred_grads, target_grads = _sobel(_luminance(pred)), _sobel(_luminance(target))
    raw: dict[str, torch.Tensor] = {
        "pixel": charbonnier(pred, target),
        "ssim": ssim_loss(pred, target),
        "edge": _edge_of(pred_grads, target_grads, _GRADIENT_EPS),
        "grad_orient": _orientation_of(pred_grads, target_grads, _GRADIENT_EPS),
        "multiscale": multiscale_loss(pred, target),
    }
    active = set(IMAGE_TERMS)
    if residual_terms and residual_flow_lowres is not None:
        raw["flow_tv"] = flow_tv(residual_flow_lowres).to(pred.dtype)
        raw["flow_mag"] = flow_mag(residual_flow_lowres).to(pred.dtype)
        raw["flow_curv"] = flow_curv(residual_flow_lowres).to(pred.dtype)
        active.update(RESIDUAL_TERMS)
    if jacobian_term and final_grid is not None:
        raw["jacobian"] = jacobian_fold_penalty(final_grid).to(pred.dtype)
        active.add("jacobian")

    total = pred.new_zeros(())
    components: dict[str, torch.Tensor] = {}
    for name in LOSS_TERMS:
        if name in active:
            weighted = getattr(weights, name) * raw[name]
            total = total + weighted
            components[name] = raw[name].detach()
            components[f"{name}_weighted"] = weighted.detach()
        else:
            components[name] = pred.new_zeros(())
            components[f"{name}_weighted"] = pred.new_zeros(())
    return total, components
