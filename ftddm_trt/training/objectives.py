"""The training objectives: FTDDM's two (Dong et al. 2024, Sect. 2.2 and 2.4) and a regression yardstick.

- Denoising UNet: ``|| M*eps - eps_theta(x_t, y, t, s) ||^2`` with ``t`` uniform in ``1..t_max``
  (``t_max = Ttrunc`` for FTDDM, ``T`` for the DDPM baselines).
- Flow: ``NLL(x_Ttrunc | y) + lambda * L_guide``, where ``x_Ttrunc = q_sample(x0, Ttrunc)`` is exactly
  the state the first reverse step consumes, and ``L_guide`` compares the flow's reverse output at
  ``tau_f = 0`` with the centre of ``q(x_Ttrunc | x0)``, i.e. ``sqrt(gamma_Ttrunc) * x0`` (the paper
  writes ``x0``; the two differ by 1.4 % at Ttrunc = 100, and the centre is what the flow should hit).

- Regression (``regression_objective``): the same UNet architecture asked for x0 directly in one
  evaluation (input the zero-filled map, t = 0), a conditional-mean estimator: the yardstick a diffusion
  model should beat.

- MUNet (``munet_pixel_loss``, the MUNet-FS-cWGAN baseline's pixel term; its adversarial term is in
  ``training.munet``): ``(1 - alpha) * L1 + alpha * (1 - MS-SSIM)`` of ``MUNet(y, s)`` against x0 inside M.
- Flow Enhancer (``flow_enhancer_objective``): ``NLL(x0 | [y, MUNet(y, s)]) + lambda * L_guide``, the flow's
  objective on the map itself, conditioned on a frozen MUNet's estimate.

All losses average over M with a per-voxel weight (``loss_weight``): 1 on the voxels a map is scored on,
``margin_weight`` on the rest of M. In the ``lr`` protocol that rest (M's dilated margin and its low-SNR
holes) holds the ``fill_outside`` extension of the truth, a target the condition does not determine; at
full weight it teaches every network an upward level bias inside the mask (docs/architecture.md,
"The two mask protocols"). ``margin_weight = 1`` is the paper's loss over all of M.
"""

from __future__ import annotations

import torch

from ftddm_trt.data.examples import Batch
from ftddm_trt.diffusion import CosineSchedule, eps_loss, flow_guide_loss, sample_train_timesteps
from ftddm_trt.models.flow_enhancer import enhancer_condition


def loss_weight(batch: Batch, margin_weight: float = 1.0) -> torch.Tensor:
    """Per-voxel loss weight (B,1,64,64): 1 on ``batch.scored``, ``margin_weight`` on the rest of M, 0 outside M."""
    if not 0.0 <= margin_weight <= 1.0:
        raise ValueError(f"margin_weight must be in [0, 1], got {margin_weight}")
    return batch.scored + margin_weight * (batch.mask - batch.scored)


def unet_objective(
    model: torch.nn.Module, batch: Batch, schedule: CosineSchedule, t_max: int, generator: torch.Generator,
    margin_weight: float = 1.0,
) -> torch.Tensor:
    """Epsilon-prediction MSE for one batch (a scalar tensor), weighted by ``loss_weight``."""
    b = batch.x0.shape[0]
    t = sample_train_timesteps(b, t_max, generator).to(batch.x0.device)
    eps = torch.randn(batch.x0.shape, generator=generator).to(batch.x0.device)
    x_t = schedule.q_sample(batch.x0, t, eps, batch.mask)
    pred = model(x_t, batch.y, t.to(torch.float32), batch.s)
    return eps_loss(pred, eps, loss_weight(batch, margin_weight))


def flow_objective(
    model: torch.nn.Module,
    batch: Batch,
    schedule: CosineSchedule,
    t_trunc: int,
    generator: torch.Generator,
    lam: float = 10.0,
    alpha: float = 0.84,
    background_noise: float = 0.01,
    margin_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """NLL + lambda * guide loss for one batch; returns (loss, parts for logging). The guide loss is weighted
    by ``loss_weight``; the NLL is a density of the whole image and is not.

    The background outside M is exactly zero in x_Ttrunc, a degenerate density; a small
    ``background_noise`` (std, normalized units) dequantizes it. Samples are cut by M afterwards.
    """
    b = batch.x0.shape[0]
    dev = batch.x0.device
    t = torch.full((b,), t_trunc, dtype=torch.long, device=dev)
    eps = torch.randn(batch.x0.shape, generator=generator).to(dev)
    x_t = schedule.q_sample(batch.x0, t, eps, batch.mask)
    bg = torch.randn(batch.x0.shape, generator=generator).to(dev)
    x_t = x_t + background_noise * (1.0 - batch.mask) * bg
    nll = model.nll(x_t, batch.y).mean()
    zeros = torch.zeros_like(batch.x0)
    x_hat = model.reverse(zeros, batch.y, torch.zeros(b, device=dev)) * batch.mask
    centre = schedule.gammas[t_trunc].sqrt().to(batch.x0.dtype) * batch.x0
    guide = flow_guide_loss(x_hat, centre, loss_weight(batch, margin_weight), alpha=alpha)
    loss = nll + lam * guide
    return loss, {"nll": float(nll.detach()), "guide": float(guide.detach())}


def regression_predict(model: torch.nn.Module, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 estimate of a regression UNet in one evaluation: ``model(zero-filled * M, y, t = 0, s) * M``.

    y: (B,4,64,64) condition (channel 0 the zero-filled map, channel 1 M); s: (B,). Returns (B,1,64,64).
    """
    mask = y[:, 1:2]
    t = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device)
    return model(y[:, 0:1] * mask, y, t, s) * mask


def regression_objective(model: torch.nn.Module, batch: Batch, margin_weight: float = 1.0) -> torch.Tensor:
    """Weighted MSE of :func:`regression_predict` against the target x0 (``loss_weight``)."""
    return eps_loss(regression_predict(model, batch.y, batch.s), batch.x0, loss_weight(batch, margin_weight))


def munet_predict(model: torch.nn.Module, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0 estimate of a MUNet in one evaluation, zero outside M (the network cuts its output by M; the
    zero-filled map enters cut by M, as for ``regression_predict``). y: (B,4,64,64); s: (B,). Returns (B,1,64,64)."""
    return model(y, s)


def munet_pixel_loss(x_hat: torch.Tensor, batch: Batch, alpha: float = 0.84, margin_weight: float = 1.0
                     ) -> torch.Tensor:
    """The MUNet generator's pixel term: ``(1 - alpha) * L1 + alpha * (1 - MS-SSIM)`` of its estimate
    ``x_hat`` (B,1,64,64) (:func:`munet_predict`) against x0, weighted by ``loss_weight`` (a scalar tensor)."""
    return flow_guide_loss(x_hat, batch.x0, loss_weight(batch, margin_weight), alpha=alpha)


def enhancer_target(batch: Batch, generator: torch.Generator, background_noise: float = 0.01) -> torch.Tensor:
    """The map the enhancer's density is fitted to: x0 with ``background_noise`` (std) outside M, which
    dequantizes the exactly-zero background (as ``flow_objective`` does for x_Ttrunc). (B,1,64,64)."""
    bg = torch.randn(batch.x0.shape, generator=generator).to(batch.x0.device)
    return batch.x0 + background_noise * (1.0 - batch.mask) * bg


def flow_enhancer_objective(
    model: torch.nn.Module,
    munet: torch.nn.Module,
    batch: Batch,
    generator: torch.Generator,
    lam: float = 10.0,
    alpha: float = 0.84,
    background_noise: float = 0.01,
    margin_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``NLL(x0 | c) + lam * L_guide`` for the flow enhancer, ``c = [y, MUNet(y, s) * M]`` with ``munet``
    frozen; the guide loss compares the reverse pass at ``tau = 0`` with x0 (weighted by ``loss_weight``).
    Returns (loss, parts for logging)."""
    b, dev = batch.x0.shape[0], batch.x0.device
    with torch.no_grad():
        cond = enhancer_condition(batch.y, munet_predict(munet, batch.y, batch.s))
    nll = model.nll(enhancer_target(batch, generator, background_noise), cond).mean()
    x_hat = model.reverse(torch.zeros_like(batch.x0), cond, torch.zeros(b, device=dev)) * batch.mask
    guide = flow_guide_loss(x_hat, batch.x0, loss_weight(batch, margin_weight), alpha=alpha)
    return nll + lam * guide, {"nll": float(nll.detach()), "guide": float(guide.detach())}
