"""Conditional Wasserstein GAN training of the MUNet-FS-cWGAN baseline (``models.munet``), and the lookup
of a trained MUNet for the flow enhancer.

Objective (WGAN-GP, Gulrajani et al. 2017; the weights are our choice where the publication is silent):

- critic: ``D(fake, y) - D(real, y) + gan_gp * GP`` (means over the batch), real = x0, fake =
  ``MUNet(y, s)`` (zero outside M), ``GP`` the gradient penalty at random interpolations
  (``models.munet.gradient_penalty``); ``critic_steps`` updates per generator update, each on the step's
  batch with a fresh interpolation;
- generator: ``pixel + gan_adv * (-D(fake, y))`` with ``pixel = (1 - alpha) L1 + alpha (1 - MS-SSIM)`` inside
  M (``training.objectives.munet_pixel_loss``; ``alpha`` = ``flow_alpha``, 0.84).

Adam with betas (0.5, 0.9) for both networks (WGAN-GP's), the run's learning-rate decay.
Validation (lower is better, kept as ``best``): the pixel loss on fixed batches.

A run folder holds ``last/`` (generator + its Adam state + state.json), ``last_critic/`` (critic + its
Adam state), ``best.safetensors`` / ``best.json`` (generator) and ``log.jsonl``. ``max_minutes`` is the
run's budget over every resume (``elapsed_s`` in the checkpoint). Every random draw of step k comes
from generators seeded by (seed, k).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ftddm_trt.constants import HR_SIZE
from ftddm_trt.data.examples import Batch, SlicePool, fixed_batches, random_batch
from ftddm_trt.integrity import strict_json
from ftddm_trt.models.io import load_meta, weights_path
from ftddm_trt.models.munet import MUNet, MUNetConfig, MUNetCritic, gradient_penalty
from ftddm_trt.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ftddm_trt.training.objectives import munet_pixel_loss, munet_predict
from ftddm_trt.training.run_config import TrainConfig, lr_at, resumed_config, save_best, training_subjects


def _adam(lr: float) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    def factory(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))  # WGAN-GP's betas

    return factory


def resolve_munet_weights(path: str | Path) -> Path:
    """The MUNet weights ``NAME`` (``NAME.safetensors`` + ``NAME.json``) that ``path`` names: a munet run folder
    (its ``best``), a model folder (its ``munet``) or the weights themselves. FileNotFoundError / ValueError
    naming what is missing or what the file holds instead."""
    p = Path(path)
    candidates = [p / "best", p / "munet"] if p.is_dir() else [p]
    for cand in candidates:
        if weights_path(cand).is_file():
            kind = load_meta(cand).get("kind")
            if kind != "munet":
                raise ValueError(f"{weights_path(cand)} holds a {kind} network, not a MUNet")
            return weights_path(cand).with_suffix("")
    raise FileNotFoundError(
        f"no MUNet weights at {p} (looked for {', '.join(str(weights_path(c)) for c in candidates)}); train one "
        "with `ftddm-trt train --task munet`"
    )


def wgan_step(gen: MUNet, critic: MUNetCritic, g_opt: torch.optim.Optimizer, c_opt: torch.optim.Optimizer,
              batch: Batch, generator: torch.Generator, cfg: TrainConfig) -> dict[str, float]:
    """``cfg.critic_steps`` critic updates on a detached fake, then one generator update against the
    updated critic; returns the losses for logging (``w_dist``: the critic's Wasserstein estimate)."""
    b = batch.x0.shape[0]
    fake = munet_predict(gen, batch.y, batch.s)
    for _ in range(cfg.critic_steps):
        alpha = torch.rand(b, generator=generator).to(batch.x0.device)
        w_dist = critic(batch.x0, batch.y).mean() - critic(fake.detach(), batch.y).mean()
        gp = gradient_penalty(critic, batch.x0, fake, batch.y, alpha)
        c_loss = -w_dist + cfg.gan_gp * gp
        c_opt.zero_grad(set_to_none=True)
        c_loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
        c_opt.step()

    critic.requires_grad_(False)
    adv = -critic(fake, batch.y).mean()
    pixel = munet_pixel_loss(fake, batch, alpha=cfg.flow_alpha, margin_weight=cfg.margin_weight)
    g_loss = pixel + cfg.gan_adv * adv
    g_opt.zero_grad(set_to_none=True)
    g_loss.backward()
    critic.requires_grad_(True)
    torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
    g_opt.step()
    return {"g": float(g_loss.detach()), "critic": float(c_loss.detach()), "w_dist": float(w_dist.detach()),
            "gp": float(gp.detach()), "adv": float(adv.detach()), "pixel": float(pixel.detach())}


@torch.no_grad()
def validate_munet(gen: MUNet, batches: list[Batch], cfg: TrainConfig, device: torch.device) -> float:
    """Mean pixel loss (``munet_pixel_loss``) on fixed batches."""
    gen.eval()
    vals = []
    for b in batches:
        b = b.to(device)
        vals.append(float(munet_pixel_loss(munet_predict(gen, b.y, b.s), b, alpha=cfg.flow_alpha,
                                           margin_weight=cfg.margin_weight)))
    gen.train()
    return float(np.mean(vals))


def train_munet(cfg: TrainConfig, run_dir: Path, max_minutes: float | None = None, device: str = "auto",
                progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the MUNet-FS-cWGAN baseline for ``cfg`` (task ``munet``) in ``run_dir`` until
    ``cfg.iterations`` or ``max_minutes`` (over every resume). Returns the summary of ``trainer.train``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    ckpt, cckpt = find_checkpoint(run_dir / "last"), find_checkpoint(run_dir / "last_critic")
    if ckpt is not None and cckpt is not None:
        gen, g_opt, state = load_checkpoint(ckpt, _adam(cfg.lr), map_location=dev)
        critic, c_opt, c_state = load_checkpoint(cckpt, _adam(cfg.lr), map_location=dev)
        cfg = resumed_config(state, cfg, run_dir)
        step, best = int(state["step"]), float(state["best_val"])
        spent_before = float(state.get("elapsed_s", 0.0))
        if int(c_state["step"]) != step:
            print(f"note: critic checkpoint at step {c_state['step']}, generator at {step}")
        mcfg = gen.config
    else:
        torch.manual_seed(cfg.seed)
        mcfg = MUNetConfig.preset(cfg.preset).replace(image_size=HR_SIZE)
        gen, critic = MUNet(mcfg).to(dev), MUNetCritic(mcfg).to(dev)
        g_opt, c_opt = _adam(cfg.lr)(gen), _adam(cfg.lr)(critic)
        step, best, spent_before = 0, float("inf"), 0.0

    train_subjects, val_subjects = training_subjects(cfg)
    pool = SlicePool.from_subjects(train_subjects)
    val_batches = fixed_batches(SlicePool.from_subjects(val_subjects), cfg.val_examples, cfg.batch_size)

    t0 = time.monotonic()

    def checkpoint() -> None:  # the critic first: a resume never finds it behind the generator
        state = {"step": step, "best_val": best, "config": asdict(cfg),
                 "elapsed_s": spent_before + time.monotonic() - t0}
        save_checkpoint(run_dir / "last_critic", critic, mcfg, c_opt, state)
        save_checkpoint(run_dir / "last", gen, mcfg, g_opt, state)

    deadline = t0 + max(0.0, 60.0 * max_minutes - spent_before) if max_minutes else None
    start_step, last_val = step, float("nan")
    parts: dict[str, float] = {}
    gen.train()
    critic.train()
    with (run_dir / "log.jsonl").open("a") as log:
        while step < cfg.iterations and not (deadline is not None and time.monotonic() >= deadline):
            rng = np.random.default_rng([cfg.seed, step])
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = random_batch(pool, cfg.batch_size, rng, cfg.lr_protocol_fraction).to(dev)
            for opt in (g_opt, c_opt):
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step)
            parts = wgan_step(gen, critic, g_opt, c_opt, batch, g, cfg)
            step += 1
            out_of_time = deadline is not None and time.monotonic() > deadline
            if step % cfg.val_every == 0 or step == cfg.iterations or out_of_time:  # a stopped run ends validated
                last_val = validate_munet(gen, val_batches, cfg, dev)
                if last_val < best:
                    best = last_val
                    save_best(gen, mcfg, run_dir)
            speed = (step - start_step) / max(time.monotonic() - t0, 1e-9)
            if step % 20 == 0 or step == cfg.iterations:
                log.write(strict_json({"step": step, **parts, "val": last_val, "lr": lr_at(cfg, step),
                                       "it_s": speed}) + "\n")
                log.flush()
                if progress:
                    print(f"munet {step}/{cfg.iterations} g {parts['g']:.4f} critic {parts['critic']:.4f} "
                          f"val {last_val:.4f} {speed:.2f} it/s", flush=True)
            if step % cfg.ckpt_every == 0 or step == cfg.iterations:
                checkpoint()
            if out_of_time:
                break
        checkpoint()
    seconds = time.monotonic() - t0
    return {"task": cfg.task, "step": step, "iterations": cfg.iterations, "val": last_val, "best_val": best,
            "seconds": seconds, "seconds_total": spent_before + seconds,
            "it_per_s": (step - start_step) / max(seconds, 1e-9),
            "params": {"generator": sum(p.numel() for p in gen.parameters()),
                       "critic": sum(p.numel() for p in critic.parameters())}}


__all__ = ["resolve_munet_weights", "train_munet", "validate_munet", "wgan_step"]
