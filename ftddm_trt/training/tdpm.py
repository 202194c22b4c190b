"""Adversarial training of the TDPM generator (``models.tdpm``), the baseline start point of Table 1.

Objective (our choice; TDPM's authors train an implicit generator adversarially):

- real samples are ``x_Ttrunc = q_sample(x0, Ttrunc, eps, M)``, the states the truncated chain consumes;
  fakes are ``G.reverse(z, y, 1) * M`` with ``z ~ N(0, I)``;
- discriminator: the non-saturating GAN loss ``softplus(-D(real, y)) + softplus(D(fake, y))`` (PatchGAN
  logits, averaged);
- generator: ``softplus(-D(fake, y)) + gan_l1 * L1`` where ``L1 = mean_M |G.reverse(0, y, 0) - sqrt(gamma) x0|``
  anchors the generator's centre (z = 0) on the centre of ``q(x_Ttrunc | x0)``, as the flow's guide loss does;
  the adversarial term shapes the spread.

Validation (lower is better, kept as ``best``): that L1 plus ``|sd_M(G(eps) - G(0)) - sqrt(1 - gamma)|``, the
error of the drawn noise level inside the mask, on fixed batches with fixed noise.

A run folder holds ``last/`` (generator + its Adam state + state.json), ``last_disc/`` (discriminator + its
Adam state), ``best.safetensors`` / ``best.json`` (generator) and ``log.jsonl``. The discriminator is
checkpointed first; a resume finds both at the same step unless it was interrupted between the two writes,
in which case the discriminator is a few steps ahead (harmless for training, and logged).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ftddm_trt.constants import T_DIFFUSION
from ftddm_trt.data.examples import Batch, SlicePool, fixed_batches, random_batch
from ftddm_trt.diffusion import CosineSchedule
from ftddm_trt.integrity import strict_json
from ftddm_trt.models.tdpm import TDPMConfig, TDPMDiscriminator, TDPMGenerator
from ftddm_trt.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ftddm_trt.training.run_config import TrainConfig, lr_at, resumed_config, save_best, training_subjects


def _adam(lr: float) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    def factory(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))  # the usual GAN betas

    return factory


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def gan_step(gen: TDPMGenerator, disc: TDPMDiscriminator, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer,
             batch: Batch, schedule: CosineSchedule, t_trunc: int, generator: torch.Generator, l1_weight: float,
             grad_clip: float = 1.0) -> dict[str, float]:
    """One discriminator update on a detached fake, then one generator update against the updated
    discriminator; returns the losses for logging."""
    b, dev = batch.x0.shape[0], batch.x0.device
    t = torch.full((b,), t_trunc, dtype=torch.long, device=dev)
    eps = torch.randn(batch.x0.shape, generator=generator).to(dev)
    real = schedule.q_sample(batch.x0, t, eps, batch.mask)
    z = torch.randn(batch.x0.shape, generator=generator).to(dev)
    fake = gen.reverse(z, batch.y, torch.ones(b, device=dev)) * batch.mask

    d_loss = F.softplus(-disc(real, batch.y)).mean() + F.softplus(disc(fake.detach(), batch.y)).mean()
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    torch.nn.utils.clip_grad_norm_(disc.parameters(), grad_clip)
    d_opt.step()

    disc.requires_grad_(False)
    adv = F.softplus(-disc(fake, batch.y)).mean()
    centre = schedule.gammas[t_trunc].sqrt().to(batch.x0.dtype) * batch.x0
    g0 = gen.reverse(torch.zeros_like(z), batch.y, torch.zeros(b, device=dev)) * batch.mask
    l1 = _masked_mean((g0 - centre).abs(), batch.mask)
    g_loss = adv + l1_weight * l1
    g_opt.zero_grad(set_to_none=True)
    g_loss.backward()
    disc.requires_grad_(True)
    torch.nn.utils.clip_grad_norm_(gen.parameters(), grad_clip)
    g_opt.step()
    return {
        "g": float(g_loss.detach()),
        "d": float(d_loss.detach()),
        "adv": float(adv.detach()),
        "l1": float(l1.detach()),
    }


@torch.no_grad()
def validate_generator(gen: TDPMGenerator, batches: list[Batch], schedule: CosineSchedule, t_trunc: int,
                       device: torch.device) -> float:
    """Centre L1 + error of the drawn noise level inside M (see the module docstring); fixed noise."""
    gen.eval()
    g = torch.Generator().manual_seed(987_654)
    target_sd = math.sqrt(1.0 - float(schedule.gammas[t_trunc]))
    vals = []
    for batch in batches:
        batch = batch.to(device)
        b = batch.x0.shape[0]
        centre = schedule.gammas[t_trunc].sqrt().to(batch.x0.dtype) * batch.x0
        g0 = gen.reverse(torch.zeros_like(batch.x0), batch.y, torch.zeros(b, device=device)) * batch.mask
        z = torch.randn(batch.x0.shape, generator=g).to(device)
        draw = gen.reverse(z, batch.y, torch.ones(b, device=device)) * batch.mask
        resid = (draw - g0)[batch.mask > 0.5]
        sd = float(resid.std()) if resid.numel() > 1 else 0.0
        vals.append(float(_masked_mean((g0 - centre).abs(), batch.mask)) + abs(sd - target_sd))
    gen.train()
    return float(np.mean(vals))


def train_tdpm(cfg: TrainConfig, run_dir: Path, max_minutes: float | None = None, device: str = "auto",
               progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the TDPM generator for ``cfg`` (a ``TrainConfig`` with task
    ``tdpm``: preset, iterations, batch size, learning rates, Ttrunc, data split, ``gan_l1``).

    Returns the same summary as ``trainer.train``: step, last and best validation value, seconds, it/s.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    schedule = CosineSchedule(T_DIFFUSION)
    ckpt, dckpt = find_checkpoint(run_dir / "last"), find_checkpoint(run_dir / "last_disc")
    if ckpt is not None and dckpt is not None:
        gen, g_opt, state = load_checkpoint(ckpt, _adam(cfg.lr), map_location=dev)
        disc, d_opt, d_state = load_checkpoint(dckpt, _adam(cfg.lr), map_location=dev)
        cfg = resumed_config(state, cfg, run_dir)
        step, best = int(state["step"]), float(state["best_val"])
        if int(d_state["step"]) != step:
            print(f"note: discriminator checkpoint at step {d_state['step']}, generator at {step}")
        mcfg = gen.config
    else:
        torch.manual_seed(cfg.seed)
        mcfg = TDPMConfig.preset(cfg.preset)
        gen, disc = TDPMGenerator(mcfg).to(dev), TDPMDiscriminator(mcfg).to(dev)
        g_opt, d_opt = _adam(cfg.lr)(gen), _adam(cfg.lr)(disc)
        step, best = 0, float("inf")

    train_subjects, val_subjects = training_subjects(cfg)  # phantoms of cfg's styles, or a site's folder
    pool = SlicePool.from_subjects(train_subjects)
    val_batches = fixed_batches(SlicePool.from_subjects(val_subjects), cfg.val_examples, cfg.batch_size)

    def checkpoint() -> None:
        state = {"step": step, "best_val": best, "config": asdict(cfg)}
        save_checkpoint(run_dir / "last_disc", disc, mcfg, d_opt, state)
        save_checkpoint(run_dir / "last", gen, mcfg, g_opt, state)

    t0 = time.monotonic()
    deadline = t0 + 60.0 * max_minutes if max_minutes else None
    start_step, last_val = step, float("nan")
    gen.train()
    disc.train()
    with (run_dir / "log.jsonl").open("a") as log:
        while step < cfg.iterations:
            rng = np.random.default_rng([cfg.seed, step])
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = random_batch(pool, cfg.batch_size, rng, cfg.lr_protocol_fraction).to(dev)
            for opt in (g_opt, d_opt):
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step)
            parts = gan_step(gen, disc, g_opt, d_opt, batch, schedule, cfg.t_trunc, g, cfg.gan_l1, cfg.grad_clip)
            step += 1
            if step % cfg.val_every == 0 or step == cfg.iterations:
                last_val = validate_generator(gen, val_batches, schedule, cfg.t_trunc, dev)
                if last_val < best:
                    best = last_val
                    save_best(gen, mcfg, run_dir)
            speed = (step - start_step) / max(time.monotonic() - t0, 1e-9)
            if step % 20 == 0 or step == cfg.iterations:
                log.write(strict_json({"step": step, **parts, "val": last_val,
                                      "lr": lr_at(cfg, step), "it_s": speed}) + "\n")
                log.flush()
                if progress:
                    print(f"tdpm {step}/{cfg.iterations} g {parts['g']:.4f} d {parts['d']:.4f} "
                          f"val {last_val:.4f} {speed:.2f} it/s", flush=True)
            if step % cfg.ckpt_every == 0 or step == cfg.iterations:
                checkpoint()
            if deadline is not None and time.monotonic() > deadline:
                break
        checkpoint()
    seconds = time.monotonic() - t0
    return {"task": cfg.task, "step": step, "iterations": cfg.iterations, "val": last_val, "best_val": best,
            "seconds": seconds, "it_per_s": (step - start_step) / max(seconds, 1e-9),
            "params": {"generator": sum(p.numel() for p in gen.parameters()),
                       "discriminator": sum(p.numel() for p in disc.parameters())}}


__all__ = ["gan_step", "train_tdpm", "validate_generator"]
