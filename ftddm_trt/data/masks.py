"""Quality masks: the paper's thresholds, qc maps on the acquired grid, and the ``lr`` support mask M.

Grid convention (see ``data.kspace``): acquired voxel ``k`` of an ``n``-grid sits at 64x64 voxel
``s * k`` with ``s = 64 / n``; its footprint covers 64x64 pixel positions ``[s*k - s/2, s*k + s/2)``.

Model of the qc maps a user gets from an ``n x n`` acquisition (:func:`lr_qc_maps`):

* The 64x64 ``snr`` map is read as the metabolite signal amplitude in units of the (white, spatially
  uniform) noise standard deviation of a 64x64 voxel.
* The signal of an acquired voxel is the area average of that amplitude over its footprint
  (partial volume: voxels straddling the brain edge or a ventricle lose signal).
* Its noise standard deviation is ``sigma_64 / s**snr_exponent``. ``snr_exponent = 1`` (default) is
  the same sequence with fewer phase encodes (same TR, ``s^2`` times shorter): exactly the noise of
  k-space truncation, where averaging ``s^2`` independent voxels divides the noise by ``s``.
  ``snr_exponent = 2`` is a time-matched scan whose SNR grows with voxel volume (``s^2``).
* The linewidth of an acquired voxel is the signal-weighted area average of the 64x64 FWHM (plain
  area average where there is no signal). Intra-voxel B0 spread is not modelled beyond that.

Area averaging uses an exact overlap matrix ``W (n, 64)`` (non-integer ``s`` included); footprints
that leave the FOV wrap around, as the FFT grid is periodic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from ftddm_trt.constants import FINE_MASK_FEATURES, FWHM_MAX_PPM, HR_SIZE, SNR_MIN  # noqa: F401 (re-exported)

__all__ = [
    "quality_mask_from_qc",
    "area_weights",
    "area_average",
    "lr_qc_maps",
    "upsample_nearest",
    "support_mask_from_lr",
    "fill_outside",
    "signal_mask_from_lr",
    "lr_support_mask",
    "SIGNAL_FRACTION",
    "fine_mask_estimate",
    "FINE_MASK_FEATURES",
    "fine_mask_features",
]


def quality_mask_from_qc(
    snr: ArrayLike, fwhm: ArrayLike, snr_min: float = SNR_MIN, fwhm_max: float = FWHM_MAX_PPM
) -> NDArray[np.bool_]:
    """The paper's quality mask: ``SNR >= 2.5`` and ``FWHM <= 0.15 ppm`` (NaN fails both).

    Args:
        snr: SNR map, any shape.
        fwhm: linewidth map in ppm, same shape as ``snr``.

    Returns:
        bool array of the common shape.
    """
    snr = np.asarray(snr)
    fwhm = np.asarray(fwhm)
    with np.errstate(invalid="ignore"):
        return (snr >= snr_min) & (fwhm <= fwhm_max)


def area_weights(n: int, size: int = HR_SIZE) -> NDArray[np.float64]:
    """Overlap matrix ``W (n, size)``: ``W[k, m]`` = fraction of acquired voxel ``k`` covered by pixel ``m``.

    Rows sum to 1. Acquired voxel ``k`` covers ``[s*k - s/2, s*k + s/2)`` in pixel units
    (``s = size / n``), pixel ``m`` covers ``[m - 1/2, m + 1/2)``; positions wrap modulo ``size``.
    """
    s = size / n
    w = np.zeros((n, size))
    m = np.arange(size)
    for k in range(n):
        lo, hi = s * k - s / 2, s * k + s / 2
        for shift in (-size, 0, size):
            ov = np.clip(np.minimum(hi, m + 0.5 + shift) - np.maximum(lo, m - 0.5 + shift), 0, None)
            w[k] += ov
    return w / s


def area_average(x: ArrayLike, n: int) -> NDArray[np.float64]:
    """Area average of ``(..., size, size)`` images over the footprints of an ``n x n`` grid -> ``(..., n, n)``."""
    x = np.asarray(x, dtype=np.float64)
    w = area_weights(n, x.shape[-1])
    return np.einsum("ki,...ij,lj->...kl", w, x, w, optimize=True)


def lr_qc_maps(
    subject_or_arrays: Any, n: int, snr_exponent: float = 1.0
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """qc maps (SNR, FWHM) that an ``n x n`` acquisition of the same subject would give.

    Args:
        subject_or_arrays: a ``PhantomSubject`` (its ``snr`` and ``fwhm``) or a pair ``(snr, fwhm)``
            of 64x64 maps, shape ``(..., 64, 64)``; FWHM in ppm.
        n: acquired matrix size.
        snr_exponent: SNR gain of an acquired voxel is ``s**snr_exponent`` before partial volume
            (module docstring: 1 = fewer encodes / k-space truncation, 2 = time-matched).

    Returns:
        ``(snr_lr, fwhm_lr)``, each ``(..., n, n)`` float32 (FWHM in ppm).
    """
    if hasattr(subject_or_arrays, "snr") and hasattr(subject_or_arrays, "fwhm"):
        snr, fwhm = subject_or_arrays.snr, subject_or_arrays.fwhm
    else:
        snr, fwhm = subject_or_arrays
    snr = np.clip(np.asarray(snr, dtype=np.float64), 0.0, None)
    fwhm = np.asarray(fwhm, dtype=np.float64)
    size = snr.shape[-1]
    s = size / n
    amp = area_average(snr, n)
    weighted = area_average(snr * fwhm, n)
    plain = area_average(fwhm, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        fwhm_lr = np.where(amp > 1e-9, weighted / np.maximum(amp, 1e-12), plain)
    snr_lr = amp * s**snr_exponent
    return snr_lr.astype(np.float32), fwhm_lr.astype(np.float32)


def fine_mask_estimate(
    snr_nn: ArrayLike, fwhm_nn: ArrayLike, size: int = HR_SIZE, snr_exponent: float = 1.0
) -> NDArray[np.bool_]:
    """Best guess of the 64x64 quality mask from qc maps on the acquired ``n x n`` grid.

    Inverts the SNR model of :func:`lr_qc_maps` for a voxel whose amplitude is uniform over its
    footprint: each 64x64 voxel inside acquired voxel ``k`` has SNR ``snr_nn[k] / s**snr_exponent``
    and the acquired linewidth. The paper's thresholds (:func:`quality_mask_from_qc`) on those values,
    nearest-upsampled. Unlike the ``lr`` support mask M (thresholds on the acquired voxel's own, ``s``
    times higher, SNR), this drops acquired voxels whose 64x64 voxels would mostly fail, e.g. those
    over a low-SNR hole; it cannot see holes smaller than an acquired voxel.

    Args:
        snr_nn, fwhm_nn: ``(..., n, n)`` qc maps of the acquisition (FWHM in ppm).
        size: output size.
        snr_exponent: as in :func:`lr_qc_maps` (1: fewer phase encodes, the k-space truncation model).

    Returns:
        ``(..., size, size)`` bool.
    """
    snr_nn = np.asarray(snr_nn, dtype=np.float64)
    s = size / snr_nn.shape[-1]
    return upsample_nearest(quality_mask_from_qc(snr_nn / s**snr_exponent, fwhm_nn), size)


def _nearest_index(n: int, size: int) -> NDArray[np.intp]:
    """For each of ``size`` pixels, the acquired voxel (of ``n``) whose footprint holds it (edge clipped)."""
    s = size / n
    k = np.floor(np.arange(size) / s + 0.5).astype(np.intp)
    return np.clip(k, 0, n - 1)


def upsample_nearest(mask_nn: ArrayLike, size: int = HR_SIZE) -> NDArray[np.bool_]:
    """Nearest-neighbour upsampling on the centred grid: ``(..., n, n)`` -> ``(..., size, size)``.

    Pixel ``m`` takes acquired voxel ``floor(m / s + 1/2)`` (ties go up), clipped to ``n - 1`` so the
    last half voxel at the FOV edge repeats the last row instead of wrapping to voxel 0.
    Works for bool or numeric input; returns the input dtype (bool for masks).
    """
    a = np.asarray(mask_nn)
    n = a.shape[-1]
    idx = _nearest_index(n, size)
    return a[..., idx[:, None], idx[None, :]]


def support_mask_from_lr(mask_nn: ArrayLike, size: int = HR_SIZE) -> NDArray[np.bool_]:
    """The ``lr``-protocol mask M: nearest upsampling then dilation by one acquired voxel.

    Args:
        mask_nn: quality mask on the acquired grid, ``(..., n, n)`` bool.
        size: output size.

    Returns:
        ``(..., size, size)`` bool: the upsampled mask dilated in-plane by ``ceil(size / n)`` pixels
        (square structuring element), so the network may fill voxels the coarse mask misses.
    """
    a = np.asarray(mask_nn).astype(bool)
    n = a.shape[-1]
    up = upsample_nearest(a, size)
    r = math.ceil(size / n)
    size_ = (1,) * (up.ndim - 2) + (2 * r + 1, 2 * r + 1)  # square element: separable max filter
    return ndimage.maximum_filter(up.view(np.uint8), size=size_, mode="constant", cval=0) > 0


def fill_outside(x: ArrayLike, mask: ArrayLike, sigmas: tuple[float, ...] = (1.5, 4.0, 12.0)) -> NDArray[np.float32]:
    """Extend a map into the voxels outside its mask: normalized convolution, finest scale first.

    Inside ``mask`` the values are kept; each outside voxel takes the Gaussian-weighted mean of the
    in-mask values around it, at the smallest of ``sigmas`` (pixels) whose weight reaches 5 %; voxels no
    scale reaches stay 0. Used as the ``lr``-protocol training target: a user's mask is coarse, so the
    network learns the underlying map inside it instead of guessing which voxels the fine mask drops.

    Args:
        x: ``(H, W)`` map; mask: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` float32.
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    out = np.where(m, x, 0.0)
    todo = ~m
    for sigma in sigmas:
        if not todo.any():
            break
        w = ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="constant")
        v = ndimage.gaussian_filter(np.where(m, x, 0.0), sigma, mode="constant")
        ok = todo & (w >= 0.05)
        out[ok] = v[ok] / w[ok]
        todo &= ~ok
    return out.astype(np.float32)


#: Fraction of a map's robust maximum above which an acquired voxel counts as signal (the ``lr`` mask M).
SIGNAL_FRACTION: float = 0.03


def signal_mask_from_lr(lr: ArrayLike, fraction: float = SIGNAL_FRACTION) -> NDArray[np.bool_]:
    """Acquired voxels that hold signal: above ``fraction`` of the map's 99th percentile, per map.

    ``lr``: ``(..., n, n)`` acquired maps (any units; each ``n x n`` map is thresholded on its own, so a
    slice's mask does not depend on the other slices). ``lr > 0`` would keep almost the whole field of
    view, since k-space truncation rings positive far outside the brain.
    """
    a = np.asarray(lr, dtype=np.float64)
    ref = np.percentile(a, 99.0, axis=(-2, -1), keepdims=True)
    return a > fraction * np.maximum(ref, 1e-12)


def lr_support_mask(lr: ArrayLike, size: int = HR_SIZE) -> NDArray[np.bool_]:
    """The ``lr``-protocol mask M from the acquired maps alone: :func:`signal_mask_from_lr`, then
    :func:`support_mask_from_lr` (nearest upsampling, dilation by one acquired voxel).

    It reads no qc map, so it is the same whatever convention a site writes its qc maps in (SNR per
    unit volume or per coarse voxel, sampled or averaged, linewidth in ppm or Hz) and when it writes
    none; training pairs use the same function (``data.examples.prepare_example``). On phantoms it covers
    more than 99.9 % of the fine quality mask's voxels at s = 2 to 8.

    Args:
        lr: ``(..., n, n)`` acquired maps.
        size: output size.

    Returns:
        ``(..., size, size)`` bool.
    """
    return support_mask_from_lr(signal_mask_from_lr(lr), size)


def _relative(values_up: NDArray[np.float64], support: NDArray[np.float32]) -> NDArray[np.float64]:
    """``values_up (..., 64, 64)`` divided by their median over each image's support (1 where empty)."""
    inside = np.where(support > 0, values_up, np.nan)
    with np.errstate(all="ignore"):
        med = np.nanmedian(inside.reshape(*inside.shape[:-2], -1), axis=-1)
    med = np.where(np.isfinite(med) & (med > 0), med, 1.0)
    return values_up / med[..., None, None]


def fine_mask_features(
    zero_filled_norm: ArrayLike, support: ArrayLike, t1: ArrayLike, flair: ArrayLike, n: int,
    snr_nn: ArrayLike | None = None, fwhm_nn: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """Input of the learned fine-mask estimator, from what an ``lr`` user has, in any qc convention.

    The qc maps enter only relative to their own median over M: the SNR of a coarse voxel is written
    per unit volume or per voxel, averaged, sampled or as a minimum, and the linewidth in ppm or Hz,
    depending on the software (``data.qc_conventions``); a ratio to the map's own median is the same
    under every one of those scalings.

    Args:
        zero_filled_norm: ``(..., 64, 64)`` normalized zero-filled map (condition channel 0).
        support: ``(..., 64, 64)`` the ``lr`` mask M (0/1).
        t1, flair: ``(..., 64, 64)`` anatomy in [0, 1] (condition channels 2, 3).
        n: acquired matrix size (``s = 64 / n``).
        snr_nn, fwhm_nn: ``(..., n, n)`` qc maps of the acquisition (any convention), or None when the
            site has none.

    Returns:
        ``(..., 8, 64, 64)`` float32: zero-filled map cut by M, M, T1, FLAIR, 1 where qc maps were given
        (else 0), ``log(1 + SNR / median SNR) / 2`` and ``FWHM / median FWHM`` (clipped to 3) of the
        acquired voxel under each pixel (both cut by M; 0 without qc maps), and ``s / 8``.
    """
    m = np.asarray(support, dtype=np.float32)
    zf = np.asarray(zero_filled_norm, dtype=np.float32)
    size = m.shape[-1]
    s = size / n
    have_qc = snr_nn is not None and fwhm_nn is not None
    if have_qc:
        snr_nn = np.asarray(snr_nn, dtype=np.float64)
        snr_up = np.clip(np.nan_to_num(upsample_nearest(snr_nn, size), nan=0.0), 0.0, None)
        fwhm_up = np.nan_to_num(upsample_nearest(np.asarray(fwhm_nn, dtype=np.float64), size), nan=np.inf)
        rel_snr = np.log1p(_relative(snr_up, m)) / 2.0 * m
        rel_fwhm = np.clip(_relative(np.where(np.isfinite(fwhm_up), fwhm_up, np.nan), m), 0.0, 3.0)
        rel_fwhm = np.nan_to_num(rel_fwhm, nan=3.0) * m
    else:
        rel_snr = rel_fwhm = np.zeros(m.shape)
    channels = [zf * m, m, np.asarray(t1, dtype=np.float32), np.asarray(flair, dtype=np.float32),
                np.full(m.shape, 1.0 if have_qc else 0.0), rel_snr, rel_fwhm, np.full(m.shape, s / 8.0)]
    return np.stack([np.broadcast_to(c, m.shape) for c in channels], axis=-3).astype(np.float32)
