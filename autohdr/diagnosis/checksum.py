"""Short, noise-tolerant digests of tensors, for the validation probe.

Semantics: the same model state on the same inputs gives the same checksum, and a real change
in the values changes it. Floating-point kernels on GPUs are not bit-reproducible, so a digest of
raw bits would read kernel noise as movement. Instead the tensor is summarized first (images and
grids are average-pooled per sample and channel to at most ``pool x pool`` cells, in float64),
then rounded to ``decimals`` decimal places, and only then hashed (SHA-256, first 16 hex digits).

The precision is ``debug_checksum_decimals`` (quantum ``q = 10**-decimals``). A change of at least
``q`` in any pooled cell always registers. Noise far below ``q`` registers only when it pushes a
cell across a rounding boundary: for independent noise of standard deviation ``sigma`` per pooled
cell the chance is at most ``2 * sigma / q`` per cell (about 1e-3 per cell for float32 kernel noise
at the default ``decimals=4``). So an unchanged digest reliably means "no movement above the
precision", while a single changed digest between epochs is weak evidence on its own on CUDA.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def summarize_for_checksum(values: torch.Tensor, pool: int = 8) -> torch.Tensor:
    """Reduce ``values`` to a small float64 tensor on the CPU.

    ``(B, C, H, W)`` tensors (images; grids permuted to ``(B, 2, H, W)``) are pooled to
    ``(B, C, <=pool, <=pool)``; other shapes are kept as they are.
    """
    values = values.detach().to(torch.float64)
    if values.ndim == 4:
        h, w = values.shape[-2:]
        values = F.adaptive_avg_pool2d(values, (min(pool, h), min(pool, w)))
    return values.cpu()


def tensor_checksum(values: torch.Tensor, decimals: int = 4, pool: int = 8) -> str:
    """16-hex-digit digest of ``values`` after pooling and rounding to ``decimals`` places."""
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals}")
    summary = summarize_for_checksum(values, pool)
    quantized = torch.round(summary * (10.0 ** decimals)).to(torch.int64)
    quantized = torch.where(quantized == 0, torch.zeros_like(quantized), quantized)  # -0 == 0
    digest = hashlib.sha256()
    digest.update(str(tuple(quantized.shape)).encode())
    digest.update(quantized.numpy().tobytes())
    return digest.hexdigest()[:16]
