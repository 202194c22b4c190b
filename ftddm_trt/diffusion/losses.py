"""Training losses of FTDDM (paper Sect. 2.2, 2.4): the UNet's eps loss and the flow's NLL + guide loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["eps_loss", "sample_train_timesteps", "flow_guide_loss", "flow_loss", "MsSsimFn"]

#: ``ms_ssim_fn(a, b) -> Tensor``: MS-SSIM of two ``(B, 1, H, W)`` batches, a scalar or ``(B,)``
#: (averaged here), differentiable in ``a``.
MsSsimFn = Callable[[Tensor, Tensor], Tensor]


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    m = torch.broadcast_to(mask.to(values.dtype), values.shape)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def eps_loss(eps_pred: Tensor, eps: Tensor, mask: Tensor | None = None) -> Tensor:
    """UNet loss ``|| eps - eps_theta(y, x_t, t, s) ||^2`` (paper Section 2, Ho et al. 2020 "simple" loss).

    With ``mask`` (the quality mask M, broadcastable to ``eps``): the mean squared error over the pixels inside
    M of the whole batch, ``sum(M (eps_pred - eps)^2) / sum(M)``. The forward noise is ``M * eps``, so the
    background's eps is not identifiable from ``x_t``, and the samplers multiply the prediction by M anyway.
    With ``mask=None``: the mean over all pixels (DDPM's ``mean_flat`` averaged over the batch).
    """
    return _masked_mean((eps_pred - eps) ** 2, mask)


def sample_train_timesteps(
    batch_size: int,
    t_max: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training timesteps, uniform in ``1..t_max`` (``t_max = Ttrunc`` for the truncated UNet, ``T`` for the full
    DDPM baseline); int64 ``(B,)``. Feed ``t.float()`` to the UNet and ``t`` to ``schedule.q_sample``."""
    if t_max < 1:
        raise ValueError(f"t_max must be >= 1, got {t_max}")
    return torch.randint(1, t_max + 1, (batch_size,), generator=generator, device=device, dtype=torch.long)


def _default_ms_ssim(a: Tensor, b: Tensor) -> Tensor:
    try:
        from ftddm_trt.data.metrics import ms_ssim_torch  # lazy: data package is a sibling
    except ImportError as exc:  # pragma: no cover - depends on the data package being present
        raise ImportError(
            "flow_guide_loss needs ftddm_trt.data.metrics.ms_ssim_torch; pass ms_ssim_fn= explicitly"
        ) from exc
    return ms_ssim_torch(a, b)


def flow_guide_loss(
    x_hat: Tensor,
    x0: Tensor,
    mask: Tensor | None = None,
    alpha: float = 0.84,
    ms_ssim_fn: MsSsimFn | None = None,
) -> Tensor:
    """Guide loss on the flow's reverse output at ``tau_f = 0``:
    ``L_guide = (1 - alpha) * L1 + alpha * (1 - MS-SSIM)``, ``alpha = 0.84`` (paper, after Zhao et al. 2017).

    ``L1`` is the mean absolute error over the pixels inside ``mask`` (all pixels with ``mask=None``);
    MS-SSIM is computed on ``M * x_hat`` against ``M * x0`` so the background does not count.
    ``ms_ssim_fn(a, b)`` defaults to ``ftddm_trt.data.metrics.ms_ssim_torch`` (imported when first needed);
    a ``(B,)`` result is averaged.
    """
    fn = ms_ssim_fn if ms_ssim_fn is not None else _default_ms_ssim
    l1 = _masked_mean((x_hat - x0).abs(), mask)
    if mask is not None:
        x_hat, x0 = x_hat * mask, x0 * mask
    ssim = fn(x_hat, x0).mean()
    return (1.0 - alpha) * l1 + alpha * (1.0 - ssim)


def flow_loss(nll: Tensor, guide: Tensor, lam: float = 10.0) -> Tensor:
    """Flow objective ``L_flow = NLL + lambda * L_guide``, ``lambda = 10`` (paper). ``nll`` may be per-sample
    ``(B,)`` (averaged) or a scalar."""
    return nll.mean() + lam * guide.mean()
