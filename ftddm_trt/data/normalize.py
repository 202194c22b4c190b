"""Intensity normalization (docs/architecture.md): per-map robust max for metabolites, [0, 1] for anatomy.

Each metabolite map of each slice is divided by ``scale`` = the 99th percentile of its zero-filled LR
inside the mask M (the whole image when M is empty there), floored at ``SCALE_FLOOR``. LR, the network
target x0 and the output then share units and ``denormalize`` brings outputs back to file units.
Pure numpy, vectorized over leading axes (no Python loop over maps).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ROBUST_PERCENTILE", "ANATOMY_PERCENTILE", "SCALE_FLOOR", "masked_percentile",
           "normalize_maps", "denormalize", "normalize_anatomy"]

ROBUST_PERCENTILE: float = 99.0
ANATOMY_PERCENTILE: float = 99.5
SCALE_FLOOR: float = 1e-6


def masked_percentile(x: ArrayLike, mask: ArrayLike | None, q: float) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Percentile ``q`` (numpy's linear method) of each image over its mask.

    Args:
        x: ``(..., H, W)`` images.
        mask: bool, broadcastable to ``x`` (or ``None`` = everywhere).
        q: percentile in ``[0, 100]``.

    Returns:
        ``(values, empty)``, both of shape ``x.shape[:-2]``; where the mask is empty, ``values`` is NaN
        and ``empty`` is True.
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
    flat = x.reshape(x.shape[:-2] + (-1,))
    mflat = m.reshape(flat.shape)
    count = mflat.sum(axis=-1)
    srt = np.sort(np.where(mflat, flat, np.inf), axis=-1)
    pos = (q / 100.0) * np.maximum(count - 1, 0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
    frac = pos - lo
    v_lo = np.take_along_axis(srt, lo[..., None], axis=-1)[..., 0]
    v_hi = np.take_along_axis(srt, hi[..., None], axis=-1)[..., 0]
    empty = count == 0
    with np.errstate(invalid="ignore"):
        values = np.where(empty, np.nan, v_lo + frac * (v_hi - v_lo))
    return values, empty


def normalize_maps(zero_filled: ArrayLike, mask: ArrayLike | None) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Divide each map by the robust max of its zero-filled LR inside the mask.

    Args:
        zero_filled: ``(..., 64, 64)`` zero-filled LR maps, e.g. ``(Z, C, 64, 64)``.
        mask: mask M, bool broadcastable to ``zero_filled`` (``None``: whole image).

    Returns:
        ``(normalized, scale)``: ``normalized`` float32 of the input shape; ``scale`` float32 of shape
        ``zero_filled.shape[:-2]`` (input units), ``>= SCALE_FLOOR``.
    """
    x = np.asarray(zero_filled, dtype=np.float32)
    inside, empty = masked_percentile(x, mask, ROBUST_PERCENTILE)
    if empty.any():
        whole, _ = masked_percentile(x, None, ROBUST_PERCENTILE)
        inside = np.where(empty, whole, inside)
    scale = np.maximum(inside, SCALE_FLOOR).astype(np.float32)
    return (x / scale[..., None, None]).astype(np.float32), scale


def denormalize(x: ArrayLike, scale: ArrayLike) -> NDArray[np.float32]:
    """Inverse of :func:`normalize_maps`: ``x (..., H, W) * scale (...)``."""
    s = np.asarray(scale, dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) * s[..., None, None]).astype(np.float32)


def normalize_anatomy(vol: ArrayLike) -> NDArray[np.float32]:
    """Scale one anatomical volume (any shape, e.g. ``(Z, 64, 64)``) to ``[0, 1]``.

    Divides by the 99.5th percentile of its positive voxels and clips; all zeros if none is positive.
    """
    v = np.asarray(vol, dtype=np.float32)
    pos = v[v > 0]
    if pos.size == 0:
        return np.zeros_like(v)
    ref = max(float(np.percentile(pos, ANATOMY_PERCENTILE)), SCALE_FLOOR)
    return np.clip(v / ref, 0.0, 1.0).astype(np.float32)
