"""k-space data consistency: keep the acquired low frequencies, let the network supply the rest.

An ``n x n`` acquisition (``data.kspace.kspace_truncate``) measures the 64x64 map's centred spectrum on
the ``n x n`` block around DC. Strictly inside that block (``|kx|, |ky| < n / 2``, the *open band*) the
zero-filled image ``zf`` carries the truth's coefficients exactly; on the Nyquist lines ``+-n/2`` only
their real, symmetrized part survives the real-valued acquisition, so those are left to the network.

For any estimate ``x`` of the map, the data-consistent estimate replaces its open band with ``zf``'s:

    x_dc = x + B_n (zf - x),   B_n = F^-1 1_{open band} F  (an orthogonal projector; the band is
                                                            symmetric, so x_dc is real)

``B_n x_dc = B_n zf``: the output reproduces the acquisition, and the truth itself is left unchanged.
By Parseval, over the whole image ``||x_dc - truth||^2 = ||(I - B_n)(x - truth)||^2 <= ||x - truth||^2``:
replacing the band can only remove error. The zero-filled baseline keeps the same band and sets the
rest to zero, so ``x_dc`` beats it exactly when the network's high frequencies are closer to the
truth's than zeros are.

With only a coarse quality mask (the ``lr`` protocol) the network estimates the map over the whole
support M, unfiltered, while the acquisition saw the quality-filtered map. :func:`partial_consistency`
re-imposes a share ``w`` of the acquisition through an estimate ``F`` of the fine quality mask:

    x_w = x + w B_n (zf - F x)

``w = 1`` and ``F = 1`` is :func:`data_consistency`; ``w = 0`` leaves ``x``. With the true fine mask
``B_n (F x_1) = B_n zf`` would hold for ``w = 1``; with an estimate, a small ``w`` corrects the level
of the acquired band without imposing the estimate's misplaced holes (docs/architecture.md, "Data consistency").

Pure torch on the last two axes; ``s`` per image (any mix of acquisition sizes in one batch).
"""

from __future__ import annotations

import torch

__all__ = ["open_band", "band_project", "band_residual", "data_consistency", "partial_consistency", "keep_if_closer"]


def _centred_fft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def _centred_ifft2(k: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1))), dim=(-2, -1))


def open_band(n: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(size, size)`` bool mask of the centred spectrum with ``|kx|, |ky| < n / 2`` (DC at ``size // 2``)."""
    if not (0 < n <= size) or n % 2:
        raise ValueError(f"acquired size n={n} must be even and in 2..{size}")
    k = torch.arange(size, device=device) - size // 2
    inside = k.abs() < n // 2
    return inside[:, None] & inside[None, :]


def band_project(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``B_n r`` per image in float64, ``n = round(m / s)``: ``r (B, C, m, m)``, ``s (B,)``."""
    size = r.shape[-1]
    ns = torch.round(size / s.double().cpu()).to(torch.int64)
    band = torch.stack([open_band(int(n), size) for n in ns.tolist()])[:, None].to(r.device)  # (B,1,m,m)
    return _centred_ifft2(_centred_fft2(r.double()) * band).real


def data_consistency(x: torch.Tensor, zero_filled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x + B_n (zero_filled - x)`` per image, ``n = round(m / s)`` (module docstring).

    Args:
        x: ``(B, C, m, m)`` estimates (normalized units).
        zero_filled: ``(B, C, m, m)`` zero-filled acquisitions in the same units (condition channel 0).
        s: ``(B,)`` upscaling factors.

    Returns:
        ``(B, C, m, m)`` estimates, computed in float64, returned in ``x``'s dtype.
    """
    return (x.double() + band_project(zero_filled.double() - x.double(), s)).to(x.dtype)


def partial_consistency(
    x: torch.Tensor, zero_filled: torch.Tensor, fine_mask: torch.Tensor, s: torch.Tensor, weight: float
) -> torch.Tensor:
    """``x + weight * B_n (zero_filled - fine_mask * x)`` per image (module docstring).

    Args:
        x, zero_filled: ``(B, C, m, m)`` as in :func:`data_consistency`.
        fine_mask: ``(B, C, m, m)`` estimate of the fine quality mask (0/1, bool or float).
        s: ``(B,)`` upscaling factors.
        weight: share ``w`` in ``[0, 1]`` of the residual band put back.

    Returns:
        ``(B, C, m, m)`` in ``x``'s dtype.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"consistency weight must be in [0, 1], got {weight}")
    r = zero_filled.double() - fine_mask.double() * x.double()
    return (x.double() + weight * band_project(r, s)).to(x.dtype)


def band_residual(x: torch.Tensor, zero_filled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """How far each estimate is from the acquisition inside its acquired band: ``||B_n (x - zero_filled)||_2``.

    Args:
        x, zero_filled: ``(B, C, m, m)`` as in :func:`data_consistency`.
        s: ``(B,)`` upscaling factors.

    Returns:
        ``(B,)`` float64 norms (normalized units; 0 means the estimate reproduces the acquisition).
    """
    r = band_project(x.double() - zero_filled.double(), s)
    return r.flatten(1).norm(dim=1)


def keep_if_closer(before: torch.Tensor, after: torch.Tensor, zero_filled: torch.Tensor, s: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The do-no-harm rule of every run-time correction: per image, ``after`` (the corrected estimate)
    where it agrees at least as well with the acquired band as ``before`` does (:func:`band_residual`),
    else ``before``.

    Every user has the acquisition, so this check needs no assumption about how the qc maps or the
    quality mask were made. Returns ``(chosen (B, C, m, m), applied (B,) bool)``.
    """
    applied = band_residual(after, zero_filled, s) <= band_residual(before, zero_filled, s)
    keep = applied.to(after.device).view(-1, *([1] * (after.dim() - 1)))
    return torch.where(keep, after, before), applied.cpu()
