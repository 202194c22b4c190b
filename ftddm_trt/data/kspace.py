"""k-space truncation: how a low-resolution MRSI acquisition relates to the 64x64 map.

Centred-grid convention (used everywhere in ftddm-trt): on an ``n``-point grid, voxel ``n // 2`` sits at
the field-of-view (FOV) centre, which is the pixel that ``ifftshift`` moves to index 0. With
``s = size / n`` the acquired voxel ``k`` therefore sits at the same place as the 64x64 voxel ``s * k``
(``data.nifti.resample.sr_affine`` relies on this).

Both functions work on the last two axes and are vectorized over any leading axes. Inputs may be any
real float array; outputs are ``float32``.

Even ``n``: the central ``n x n`` block of a real image's spectrum is not Hermitian-symmetric on the
``n``-periodic grid (its Nyquist row/column ``-n/2`` has no ``+n/2`` partner), so the inverse transform
is complex and only its real part is kept. ``zero_fill`` is then computed *from that real image*, which
amounts to splitting the Nyquist coefficients evenly between ``-n/2`` and ``+n/2`` of the 64x64 spectrum.
``kspace_truncate`` returns exactly that zero-filled image, so that ``zero_fill(lr)`` reproduces it: the
network input can always be recomputed from the acquired map alone.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ftddm_trt.constants import HR_SIZE

__all__ = ["centred_fft2", "centred_ifft2", "kspace_truncate", "zero_fill"]


def centred_fft2(x: ArrayLike) -> NDArray[np.complex128]:
    """Centred 2D FFT over the last two axes: DC lands at index ``(m // 2, m // 2)``.

    Unnormalized forward transform (numpy's ``norm="backward"``).
    """
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(np.asarray(x), axes=(-2, -1))), axes=(-2, -1))


def centred_ifft2(k: ArrayLike) -> NDArray[np.complex128]:
    """Inverse of :func:`centred_fft2` (``1 / m^2`` normalization)."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(np.asarray(k), axes=(-2, -1))), axes=(-2, -1))


def _check_n(n: int, size: int) -> None:
    if not (0 < n <= size) or n % 2:
        raise ValueError(f"acquired size n={n} must be even and in 2..{size}")


def kspace_truncate(x: ArrayLike, n: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Simulate an ``n x n`` acquisition of 64x64 maps by keeping the central ``n x n`` of k-space.

    Args:
        x: real maps, shape ``(..., size, size)`` (``size`` is normally 64), any units.
        n: acquired matrix size (even, ``n <= size``).

    Returns:
        ``(lr, zero_filled)``: ``lr`` of shape ``(..., n, n)`` is the inverse FFT of the ``n x n`` block,
        scaled by ``n^2 / size^2`` so that its mean equals the mean of ``x`` (same units as ``x``), real
        part; ``zero_filled`` of shape ``(..., size, size)`` is the block zero-padded back to
        ``size x size`` and inverse transformed, equal to ``zero_fill(lr, size)``.
    """
    x = np.asarray(x)
    size = x.shape[-1]
    if x.ndim < 2 or x.shape[-2] != size:
        raise ValueError(f"expected square images (..., m, m), got shape {x.shape}")
    _check_n(n, size)
    k = centred_fft2(x)
    lo = size // 2 - n // 2
    block = k[..., lo : lo + n, lo : lo + n]
    lr = (centred_ifft2(block).real * (n * n / (size * size))).astype(np.float32)
    return lr, zero_fill(lr, size)


def zero_fill(lr: ArrayLike, size: int = HR_SIZE) -> NDArray[np.float32]:
    """Zero-filled (Fourier-interpolated) ``size x size`` image of acquired ``n x n`` maps.

    Args:
        lr: acquired maps, shape ``(..., n, n)``, real, any units (``n`` even, ``n <= size``).
        size: output matrix size.

    Returns:
        ``(..., size, size)`` float32, same units and mean as ``lr``; at the voxels ``s * k``
        (``s = size / n``) it equals ``lr[..., k]`` when ``s`` is an integer.
    """
    lr = np.asarray(lr)
    n = lr.shape[-1]
    if lr.ndim < 2 or lr.shape[-2] != n:
        raise ValueError(f"expected square images (..., n, n), got shape {lr.shape}")
    _check_n(n, size)
    block = centred_fft2(lr) * (size * size / (n * n))
    lo = size // 2 - n // 2
    padded = np.zeros(lr.shape[:-2] + (size, size), dtype=np.complex128)
    padded[..., lo : lo + n, lo : lo + n] = block
    return centred_ifft2(padded).real.astype(np.float32)
