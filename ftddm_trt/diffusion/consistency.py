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

Pure torch on the last two axes; ``s`` per image (any mix of acquisition sizes in one batch).
"""

from __future__ import annotations

import torch

__all__ = ["open_band", "data_consistency"]


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


def data_consistency(x: torch.Tensor, zero_filled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x + B_n (zero_filled - x)`` per image, ``n = round(m / s)`` (module docstring).

    Args:
        x: ``(B, C, m, m)`` estimates (normalized units).
        zero_filled: ``(B, C, m, m)`` zero-filled acquisitions in the same units (condition channel 0).
        s: ``(B,)`` upscaling factors.

    Returns:
        ``(B, C, m, m)`` estimates, computed in float64, returned in ``x``'s dtype.
    """
    size = x.shape[-1]
    ns = torch.round(size / s.double().cpu()).to(torch.int64)
    band = torch.stack([open_band(int(n), size) for n in ns.tolist()])[:, None].to(x.device)  # (B,1,m,m)
    diff = _centred_fft2(zero_filled.double() - x.double()) * band
    return (x.double() + _centred_ifft2(diff).real).to(x.dtype)
