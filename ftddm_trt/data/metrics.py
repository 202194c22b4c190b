"""Image-quality metrics of the paper (NRMSE, PSNR, SSIM) and a sharpness ratio in a region, and a differentiable
MS-SSIM.

Conventions (paper-style evaluation of masked metabolite maps):

* ``pred`` and ``truth`` are ``(..., H, W)``; the optional ``mask`` (bool, broadcastable) is the region
  (normally the 64x64 quality mask). Leading axes give one value per image.
* ``data_range`` defaults to the maximum of ``truth`` inside the region (quality-filtered maps are 0
  outside and >= 0 inside, so this is the truth's max - min over the whole image as well).
* NRMSE = ``||pred - truth|| / ||truth||`` over the region (scikit-image's default "euclidean").
* PSNR = ``10 log10(data_range^2 / MSE)`` over the region.
* SSIM = Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5, truncate 3.5), K1 = 0.01,
  K2 = 0.03, population covariance (scikit-image with ``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False``). The SSIM map is computed on the whole image (reflective borders)
  and averaged over the region; without a mask it is averaged over the image minus a 5-pixel border,
  exactly like scikit-image.
* Sharpness = mean gradient magnitude of ``pred`` over the truth's, both inside the region: at each voxel
  whose right and lower neighbours are in the region too, ``sqrt(dx^2 + dy^2)`` with forward differences
  (so the jump to the zeros outside a masked map never counts). 1 = as sharp as the truth, < 1 blurrier,
  > 1 more detail than the truth (noise, ringing). NaN where the region holds no such voxel, or where the
  truth is flat there (no detail to compare with) and ``pred`` is not; 1 where both are flat.
* ``ms_ssim_torch``: 64x64 maps are too small for the standard 5 scales with 11-tap windows (the
  coarsest would be 4x4), so it uses 3 scales (64, 32, 16 px) with a 7-tap Gaussian window
  (sigma 1.5), valid convolution, and the first three standard weights (0.0448, 0.2856, 0.3001)
  renormalized to sum 1; per-scale terms are clamped at 1e-6 (not 0: keeps the fractional powers differentiable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = ["nrmse", "psnr", "sharpness", "ssim", "ssim_map", "ms_ssim_torch", "MS_SSIM_WEIGHTS"]

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_K1, _K2 = 0.01, 0.03


def _prep(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None) -> tuple[NDArray, NDArray, NDArray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} differ in shape")
    m = np.ones(t.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), t.shape)
    return p, t, m


def _out(v: NDArray) -> float | NDArray[np.float64]:
    return float(v) if np.ndim(v) == 0 else v


def _default_range(t: NDArray, m: NDArray, data_range: float | ArrayLike | None) -> NDArray[np.float64]:
    if data_range is not None:
        return np.broadcast_to(np.asarray(data_range, dtype=np.float64), t.shape[:-2])
    return np.where(m, t, -np.inf).max(axis=(-2, -1))


def nrmse(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float | NDArray[np.float64]:
    """``||pred - truth|| / ||truth||`` inside ``mask``, per image (``(..., H, W)`` -> ``(...)``)."""
    p, t, m = _prep(pred, truth, mask)
    num = np.sqrt(((p - t) ** 2 * m).sum(axis=(-2, -1)))
    den = np.sqrt((t**2 * m).sum(axis=(-2, -1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return _out(num / den)


def psnr(
    pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None, data_range: float | ArrayLike | None = None
) -> float | NDArray[np.float64]:
    """PSNR in dB inside ``mask``; ``data_range`` defaults to the max of ``truth`` in the region."""
    p, t, m = _prep(pred, truth, mask)
    r = _default_range(t, m, data_range)
    mse = ((p - t) ** 2 * m).sum(axis=(-2, -1)) / np.maximum(m.sum(axis=(-2, -1)), 1)
    with np.errstate(divide="ignore"):
        return _out(10.0 * np.log10(r**2 / mse))


def _gradient_sum(x: NDArray, m: NDArray) -> tuple[NDArray, NDArray]:
    """Sum of the forward-difference gradient magnitude over the voxels of ``m`` whose right and lower
    neighbours are in ``m`` too, and how many voxels that was."""
    gx = np.diff(x, axis=-1)[..., :-1, :]
    gy = np.diff(x, axis=-2)[..., :, :-1]
    inside = m[..., :-1, :-1] & m[..., :-1, 1:] & m[..., 1:, :-1]
    return (np.sqrt(gx**2 + gy**2) * inside).sum(axis=(-2, -1)), inside.sum(axis=(-2, -1))


def sharpness(pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float | NDArray[np.float64]:
    """Mean gradient magnitude of ``pred`` over the truth's inside ``mask``, per image (1 = as sharp as the
    truth, < 1 blurrier, > 1 noisier); NaN with no voxel to measure or a flat truth under a non-flat ``pred``."""
    p, t, m = _prep(pred, truth, mask)
    gp, k = _gradient_sum(p, m)
    gt, _ = _gradient_sum(t, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(gt > 0, gp / gt, np.where(gp > 0, np.nan, 1.0))
    return _out(np.where(k > 0, ratio, np.nan))


def ssim_map(pred: ArrayLike, truth: ArrayLike, data_range: float | ArrayLike) -> NDArray[np.float64]:
    """Per-pixel SSIM ``(..., H, W)`` (Gaussian sigma 1.5, truncate 3.5, reflective borders)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    lead = p.ndim - 2
    sig = (0.0,) * lead + (1.5, 1.5)

    def f(a: NDArray) -> NDArray:
        return ndimage.gaussian_filter(a, sigma=sig, truncate=3.5, mode="reflect")

    r = np.broadcast_to(np.asarray(data_range, dtype=np.float64), p.shape[:-2])[..., None, None]
    c1, c2 = (_K1 * r) ** 2, (_K2 * r) ** 2
    ux, uy = f(p), f(t)
    vx = f(p * p) - ux * ux
    vy = f(t * t) - uy * uy
    vxy = f(p * t) - ux * uy
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def ssim(
    pred: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None, data_range: float | ArrayLike | None = None
) -> float | NDArray[np.float64]:
    """Mean SSIM inside ``mask`` (whole image minus a 5-px border when ``mask`` is None)."""
    p, t, m = _prep(pred, truth, mask)
    r = _default_range(t, m, data_range)
    s = ssim_map(p, t, r)
    if mask is None:
        m = np.zeros(t.shape, dtype=bool)
        m[..., 5:-5, 5:-5] = True
    with np.errstate(invalid="ignore"):
        return _out((s * m).sum(axis=(-2, -1)) / m.sum(axis=(-2, -1)))


def _gauss_window(size: int, sigma: float) -> "torch.Tensor":
    import torch

    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ms_ssim_torch(
    x: "torch.Tensor",
    y: "torch.Tensor",
    data_range: float = 1.0,
    scales: int = 3,
    win_size: int = 7,
    sigma: float = 1.5,
    weights: tuple[float, ...] | None = None,
) -> "torch.Tensor":
    """Differentiable multi-scale SSIM of ``(B, C, H, W)`` tensors, averaged over the batch -> scalar.

    Defaults for 64x64 maps: 3 scales (64, 32, 16 px), 7-tap Gaussian window (sigma 1.5), weights =
    first ``scales`` standard MS-SSIM weights renormalized. Downsampling is 2x2 average pooling.
    With ``scales=1, win_size=11`` it equals the border-cropped single-scale SSIM of :func:`ssim`.
    """
    import torch
    import torch.nn.functional as F

    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected equal (B, C, H, W) shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if weights is None:
        w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
        w = w / w.sum()
    else:
        w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    min_side = win_size * 2 ** (scales - 1)
    if min(x.shape[-2:]) < min_side:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are too small for {scales} scales of a {win_size}-px window")
    c = x.shape[1]
    g = _gauss_window(win_size, sigma).to(device=x.device, dtype=x.dtype)
    kh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(a, kh, groups=c), kv, groups=c)

    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    values = []
    for i in range(scales):
        ux, uy = filt(x), filt(y)
        vx = filt(x * x) - ux * ux
        vy = filt(y * y) - uy * uy
        vxy = filt(x * y) - ux * uy
        cs = (2 * vxy + c2) / (vx + vy + c2)
        lum = (2 * ux * uy + c1) / (ux**2 + uy**2 + c1)
        if i < scales - 1:
            values.append(cs.mean(dim=(-2, -1)).clamp_min(1e-6))
            x = F.avg_pool2d(x, 2)
            y = F.avg_pool2d(y, 2)
        else:
            values.append((lum * cs).mean(dim=(-2, -1)).clamp_min(1e-6))
    stacked = torch.stack(values, dim=0)  # (scales, B, C)
    out = torch.prod(stacked ** w.view(-1, 1, 1), dim=0)
    return out.mean()

