"""Affines of the acquired and the 64x64 grids, and resampling of masks and images between grids.

Affines (centred grid, see ``data.kspace``): acquired voxel ``k`` and 64x64 voxel ``s * k`` are the same
world point, and voxel 0 of both grids is the same point. Hence ``A_SR = A_LR @ diag(1/s, 1/s, 1, 1)``
exactly (no half-voxel shift: that shift belongs to the corner-aligned convention, not to FFT grids).

Volumes here are on-disk ``(X, Y, Z)`` arrays with their ``(4, 4)`` voxel -> world (mm) affines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from ftddm_trt.constants import HR_SIZE
from ftddm_trt.data.nifti.files import InputError

__all__ = ["sr_affine", "lr_affine_for", "inside_extent", "nearest_onto", "linear_onto"]


def sr_affine(lr_affine: ArrayLike, n: int, size: int = HR_SIZE) -> NDArray[np.float64]:
    """Affine of the ``size x size`` SR grid from the affine of the ``n x n`` acquired grid.

    ``A_SR = A_LR @ diag(n / size, n / size, 1, 1)``: SR voxel ``s * k`` lands on acquired voxel ``k``.
    """
    return np.asarray(lr_affine, dtype=np.float64) @ np.diag([n / size, n / size, 1.0, 1.0])


def lr_affine_for(sr_affine_: ArrayLike, n: int, size: int = HR_SIZE) -> NDArray[np.float64]:
    """Affine of an ``n x n`` acquisition of the same FOV as the ``size x size`` grid ``sr_affine_``."""
    return np.asarray(sr_affine_, dtype=np.float64) @ np.diag([size / n, size / n, 1.0, 1.0])


def _sr_points_in(src_affine: NDArray, dst_affine: NDArray, dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.float64]:
    """Voxel coordinates in the source grid of every destination voxel centre: ``(3, X, Y, Z)``."""
    m = np.linalg.inv(src_affine) @ dst_affine
    idx = np.indices(dst_shape_xyz, dtype=np.float64)
    return np.einsum("ab,bxyz->axyz", m[:3, :3], idx) + m[:3, 3][:, None, None, None]


def inside_extent(src_shape: tuple[int, ...], src_affine: NDArray, dst_affine: NDArray,
                  dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.bool_]:
    """``(X, Y, Z)`` bool: destination voxel centres inside the source image's field of view."""
    v = _sr_points_in(src_affine, dst_affine, dst_shape_xyz)
    inside = np.ones(dst_shape_xyz, dtype=bool)
    for a in range(3):
        inside &= (v[a] >= -0.5) & (v[a] <= src_shape[a] - 0.5)
    return inside


def nearest_onto(path: Path, vol: NDArray, src_affine: NDArray, dst_affine: NDArray,
                 dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.bool_]:
    """Nearest-neighbour resampling of a mask ``(X, Y, Z)`` onto another grid; outside -> False.

    A destination voxel takes source voxel ``floor(v + 1/2)``; it counts as inside when ``v`` lies within
    half a source voxel beyond the edge voxels' footprints (``-1 <= v <= N``), clipped to the edge voxel,
    which matches ``masks.upsample_nearest`` for an acquired-grid mask.
    """
    v = _sr_points_in(src_affine, dst_affine, dst_shape_xyz)
    inside = np.ones(dst_shape_xyz, dtype=bool)
    idx = []
    for a in range(3):
        inside &= (v[a] >= -1.0 - 1e-6) & (v[a] <= vol.shape[a] + 1e-6)
        idx.append(np.clip(np.floor(v[a] + 0.5).astype(np.intp), 0, vol.shape[a] - 1))
    if not inside.any():
        raise InputError(path, "mask does not overlap the MRSI field of view")
    return inside & (vol[idx[0], idx[1], idx[2]] > 0.5)


def linear_onto(path: Path, vol: NDArray, src_affine: NDArray, dst_affine: NDArray,
                dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.float32]:
    """Linear resampling of an image ``(X, Y, Z)`` onto another grid (0 outside).

    Source axes sampled more than 2.5x finer than the destination's in-plane voxels are first smoothed
    with a Gaussian of ``0.4 r`` voxels (``r`` = destination step in source voxels) against aliasing.
    """
    v = _sr_points_in(src_affine, dst_affine, dst_shape_xyz)
    inside = inside_extent(vol.shape, src_affine, dst_affine, dst_shape_xyz)
    if inside.mean() < 0.01:
        raise InputError(
            path, f"image does not overlap the MRSI field of view ({100 * inside.mean():.1f}% of it covered)"
        )
    jac = np.abs((np.linalg.inv(src_affine) @ dst_affine)[:3, :2]).max(axis=1)  # src voxels per in-plane SR step
    sigma = np.where(jac > 2.5, 0.4 * jac, 0.0)
    src = ndimage.gaussian_filter(vol, sigma, mode="nearest") if np.any(sigma > 0) else vol
    out = ndimage.map_coordinates(src, v.reshape(3, -1), order=1, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(dst_shape_xyz).astype(np.float32)

