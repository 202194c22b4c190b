"""Resumable training of the three FTDDM networks on the phantom dataset.

``task`` is one of:
- ``unet``: the denoising UNet of FTDDM, t uniform in 1..Ttrunc;
- ``unet_full``: the same UNet trained on the whole chain 1..T, for the DDPM / DPM-Solver++ baselines;
- ``flow``: the conditional flow that draws x_Ttrunc;
- ``tdpm``: the TDPM baseline's generator of x_Ttrunc, trained adversarially (``training.tdpm``);
- ``regression``: the UNet asked for x0 in one evaluation (``training.objectives.regression_objective``),
  the conditional-mean yardstick of the benchmarks;
- ``munet``: the MUNet-FS-cWGAN baseline, trained as a conditional WGAN-GP (``training.munet``);
- ``flow_enhancer``: the Flow Enhancer baseline's flow, conditioned on a trained, frozen MUNet
  (``cfg.munet``; ``training.objectives.flow_enhancer_objective``).

A run folder holds ``last/`` (the resumable checkpoint), ``best.safetensors`` + ``best.json`` (lowest
validation loss) and ``log.jsonl``. Every random draw of step k comes from generators seeded by
(seed, k), so a resumed run continues exactly where an uninterrupted one would have gone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftddm_trt.constants import HR_SIZE, T_DIFFUSION
from ftddm_trt.data.examples import SlicePool, fixed_batches, random_batch
from ftddm_trt.diffusion import CosineSchedule
from ftddm_trt.integrity import strict_json
from ftddm_trt.models import ConditionalFlow, DenoisingUNet, FlowConfig, UNetConfig
from ftddm_trt.models.flow_enhancer import FlowEnhancer, FlowEnhancerConfig, enhancer_condition
from ftddm_trt.models.io import load_model, model_sha256
from ftddm_trt.training.checkpoint import find_checkpoint, load_checkpoint, load_ema_state, save_checkpoint
from ftddm_trt.training.distributed import DistContext, ObjectiveModule, backward_step, check_shards
from ftddm_trt.training.munet import resolve_munet_weights, train_munet
from ftddm_trt.training.objectives import (
    enhancer_target,
    flow_enhancer_objective,
    flow_objective,
    munet_predict,
    regression_objective,
    unet_objective,
)
from ftddm_trt.training.run_config import (
    TASKS,
    TrainConfig,
    config_changes,
    lr_at,
    resumed_config,
    save_best,
    training_subjects,
)
from ftddm_trt.training.tdpm import train_tdpm

__all__ = ["TASKS", "TrainConfig", "build_model", "config_changes", "prior_steps", "resumed_config", "train",
           "training_subjects", "validate", "weight_average"]


def prior_steps(weights: Path) -> int:
    """Training iterations behind the weights ``DIR/NAME`` of a model folder: its manifest entry's
    ``cumulative_steps`` (or ``step``); 0 when the folder has no manifest entry for it.

    Recorded as ``extra["init_steps"]`` of a run started from those weights, so that ``package_model`` can
    state every network's whole training budget (``cumulative_steps``), not only its last run's."""
    manifest = Path(weights).parent / "manifest.json"
    try:
        entry = json.loads(manifest.read_text())["networks"][Path(weights).name]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return int(entry.get("cumulative_steps") or entry.get("step") or 0)


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """A fresh network and its config for the task's preset, at the data's image size (64 px)."""
    if cfg.task == "flow":
        mcfg = FlowConfig.preset(cfg.preset).replace(image_size=HR_SIZE)
        return ConditionalFlow(mcfg), mcfg
    if cfg.task == "flow_enhancer":
        ecfg = FlowEnhancerConfig.preset(cfg.preset).replace(image_size=HR_SIZE)
        return FlowEnhancer(ecfg), ecfg
    if cfg.task not in ("unet", "unet_full", "regression"):
        raise ValueError(f"the {cfg.task} task builds its networks in its own trainer")
    mcfg = UNetConfig.preset(cfg.preset).replace(image_size=HR_SIZE)
    return DenoisingUNet(mcfg), mcfg


def _frozen_munet(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The MUNet a ``flow_enhancer`` run enhances (``cfg.munet``), in eval mode without gradients; ValueError
    when its weights are not the ones the run started with (``cfg.extra["munet_sha256"]``)."""
    path = resolve_munet_weights(cfg.munet)
    want = cfg.extra.get("munet_sha256")
    if want and model_sha256(path) != want:
        raise ValueError(f"{path} is not the MUNet this flow_enhancer run was started with (sha256 {want}): "
                         "give the same --munet, or train into a new run folder")
    return load_model(path, map_location=device).requires_grad_(False)


def _optimizer(cfg: TrainConfig):
    def factory(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)

    return factory


def _step_loss(cfg: TrainConfig, model, batch, schedule, gen, munet=None) -> tuple[torch.Tensor, dict[str, float]]:
    if cfg.task == "flow_enhancer":
        return flow_enhancer_objective(model, munet, batch, gen, lam=cfg.flow_lambda, alpha=cfg.flow_alpha,
                                       margin_weight=cfg.margin_weight)
    if cfg.task == "flow":
        return flow_objective(model, batch, schedule, cfg.t_trunc, gen, lam=cfg.flow_lambda, alpha=cfg.flow_alpha,
                              margin_weight=cfg.margin_weight)
    if cfg.task == "regression":
        return regression_objective(model, batch, margin_weight=cfg.margin_weight), {}
    loss = unet_objective(model, batch, schedule, cfg.t_max, gen, margin_weight=cfg.margin_weight)
    return loss, {}


@torch.no_grad()
def validate(cfg: TrainConfig, model, batches, schedule, device, munet: torch.nn.Module | None = None) -> float:
    """Mean validation loss on fixed batches with fixed noise (comparable across steps); ``munet``: the
    frozen MUNet a ``flow_enhancer`` run enhances."""
    model.eval()
    gen = torch.Generator().manual_seed(987_654)
    losses = [float(_step_loss(cfg, model, b.to(device), schedule, gen, munet)[0]) for b in batches]
    model.train()
    return float(np.mean(losses))


def weight_average(model: torch.nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None):
    """An exponential moving average of ``model``'s parameters (``torch.optim.swa_utils.AveragedModel``:
    ``p_avg <- decay * p_avg + (1 - decay) * p`` after every optimizer step, starting from the current
    weights), or None when ``decay`` is 0. ``state``: a saved average to continue from."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    if state is not None:
        ema.module.load_state_dict(state)
        ema.n_averaged.fill_(1)  # continue averaging instead of copying the weights again
    else:
        ema.update_parameters(model)  # the first update copies: the average starts at these weights
    return ema


def train(
    cfg: TrainConfig,
    run_dir: Path,
    max_minutes: float | None = None,
    device: str = "auto",
    progress: bool = True,
    init_from: Path | None = None,
    dist_ctx: DistContext | None = None,
    patience: int = 0,
) -> dict[str, Any]:
    """Train (or resume) ``cfg`` in ``run_dir`` until ``cfg.iterations`` or ``max_minutes``.

    ``init_from`` (weights saved by ``models.io``, same kind and preset) starts a new run from those
    weights instead of a fresh initialization, e.g. a flow for Ttrunc = 50 fine-tuned from the
    Ttrunc = 100 flow; it is ignored when the run resumes from its own checkpoint.
    ``dist_ctx`` (``training.distributed.init_from_env`` under torchrun): train across processes,
    ``cfg.extra["shards"]`` shards per global batch (default: one per process); only rank 0 writes.
    ``patience > 0`` stops the run once that many validations in a row have not improved on the best
    (early stopping; the count is kept in the checkpoint, so it survives a resume).
    ``max_minutes`` is the run's budget over every resume: the checkpoint keeps the time spent
    (``elapsed_s``) and a resumed run gets only what is left. ``log.jsonl`` is strict JSON (NaN is null).
    Returns a summary: step reached, last and best validation loss, seconds (this run's and, as
    ``seconds_total``, every run's), iterations per second.
    """
    if cfg.task == "tdpm":
        if init_from is not None:
            raise ValueError("--init-from is not supported for the tdpm task")
        if patience:
            raise ValueError("--patience is not supported for the tdpm task")
        if dist_ctx is not None and dist_ctx.enabled:
            raise ValueError("the tdpm task trains in one process: run it without torchrun")
        return train_tdpm(cfg, run_dir, max_minutes=max_minutes, device=device, progress=progress)
    if cfg.task == "munet":
        if init_from is not None or patience:
            raise ValueError("--init-from and --patience are not supported for the munet task")
        if dist_ctx is not None and dist_ctx.enabled:
            raise ValueError("the munet task trains in one process: run it without torchrun")
        return train_munet(cfg, run_dir, max_minutes=max_minutes, device=device, progress=progress)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    ctx = dist_ctx or DistContext(device=dev)
    dev = ctx.device
    schedule = CosineSchedule(T_DIFFUSION)

    ckpt = find_checkpoint(run_dir / "last")
    needs_data_init = False
    if ckpt is not None:
        model, opt, state = load_checkpoint(ckpt, _optimizer(cfg), map_location=dev)
        cfg = resumed_config(state, cfg, run_dir)
        mcfg = model.config
        step, best = int(state["step"]), float(state["best_val"])
        stale = int(state.get("stale_validations", 0))
    else:
        torch.manual_seed(cfg.seed)
        model, mcfg = build_model(cfg)
        if init_from is not None:
            init = load_model(init_from)
            if init.config != mcfg:
                raise ValueError(f"{init_from} is not a {cfg.task}/{cfg.preset} network: its config differs")
            model.load_state_dict(init.state_dict())
            cfg.extra.setdefault("init_steps", prior_steps(init_from))
        model.to(dev)
        opt = _optimizer(cfg)(model)
        step, best = 0, float("inf")
        stale = 0
        needs_data_init = cfg.task in ("flow", "flow_enhancer") and init_from is None
        if cfg.task == "flow_enhancer":  # the MUNet it enhances, recorded so that a resume finds the same one
            cfg.extra.setdefault("munet_sha256", model_sha256(resolve_munet_weights(cfg.munet)))
    munet = _frozen_munet(cfg, dev) if cfg.task == "flow_enhancer" else None

    ema = weight_average(model, cfg.ema, load_ema_state(ckpt, map_location=dev) if ckpt is not None else None)
    scored = ema.module if ema is not None else model  # the weights validation scores and best.* keeps

    train_subjects, val_subjects = training_subjects(cfg)
    train_pool = SlicePool.from_subjects(train_subjects)
    val_batches = fixed_batches(SlicePool.from_subjects(val_subjects), cfg.val_examples, cfg.batch_size)

    if needs_data_init:  # ActNorm data-dependent init on one batch of flow targets
        init_batch = random_batch(train_pool, 32, np.random.default_rng([cfg.seed, 10**9])).to(dev)
        init_gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            if cfg.task == "flow_enhancer":
                cond = enhancer_condition(init_batch.y, munet_predict(munet, init_batch.y, init_batch.s))
                model.data_init(enhancer_target(init_batch, init_gen), cond)
            else:
                t = torch.full((init_batch.x0.shape[0],), cfg.t_trunc, dtype=torch.long, device=dev)
                eps = torch.randn(init_batch.x0.shape, generator=init_gen).to(dev)
                model.data_init(schedule.q_sample(init_batch.x0, t, eps, init_batch.mask), init_batch.y)
    shards = int(cfg.extra.setdefault("shards", ctx.world_size))
    check_shards(shards, cfg.batch_size, ctx)
    step_model = ctx.wrap(ObjectiveModule(model, lambda net, b, g: _step_loss(cfg, net, b, schedule, g, munet)))

    log = (run_dir / "log.jsonl").open("a") if ctx.is_main else open(os.devnull, "w")
    t0 = time.monotonic()
    start_step = step
    last_val = float("nan")
    stopped_early = False
    spent_before = float(state.get("elapsed_s", 0.0)) if ckpt is not None else 0.0  # the budget spans every rerun
    deadline = t0 + max(0.0, 60.0 * max_minutes - spent_before) if max_minutes else None

    def checkpoint() -> None:
        if not ctx.is_main:
            return
        state = {"step": step, "best_val": best, "stale_validations": stale, "config": asdict(cfg),
                 "elapsed_s": spent_before + time.monotonic() - t0}
        save_checkpoint(
            run_dir / "last", model, mcfg, opt, state, ema_state=scored.state_dict() if ema is not None else None
        )

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # with a time budget the bar follows the clock (the iterations may never be reached), else the steps
    timed = deadline is not None
    columns = [TextColumn(f"[bold]{cfg.task}"), BarColumn(),
               TextColumn("step {task.fields[step]}") if timed else MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  val {task.fields[val]:.4f}  {task.fields[speed]:.2f} it/s"),
               TimeRemainingColumn()]

    def done() -> float:
        return min(spent_before + time.monotonic() - t0, 60.0 * max_minutes) if timed else step

    with Progress(*columns, disable=not progress or not ctx.is_main) as bar:
        task = bar.add_task("train", total=60.0 * max_minutes if timed else cfg.iterations, completed=done(), step=step,
                            loss=float("nan"), val=float("nan"), speed=0.0)
        model.train()
        exhausted = deadline is not None and spent_before >= 60.0 * max_minutes  # earlier runs spent the budget
        while step < cfg.iterations and not exhausted:
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            opt.zero_grad(set_to_none=True)
            loss, parts = backward_step(
                ctx,
                step_model,
                lambda rng, n: random_batch(train_pool, n, rng, cfg.lr_protocol_fraction).to(dev),
                cfg.seed,
                step,
                cfg.batch_size,
                shards,
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            speed = (step - start_step) / max(time.monotonic() - t0, 1e-9)
            # agreed by every rank (a collective), so all ranks validate and stop at the same step
            out_of_time = ctx.any_true(deadline is not None and time.monotonic() > deadline)
            if step % cfg.val_every == 0 or step == cfg.iterations or out_of_time:  # a stopped run ends validated
                last_val = validate(cfg, scored, val_batches, schedule, dev, munet)
                if last_val < best:
                    best, stale = last_val, 0
                    if ctx.is_main:
                        save_best(scored, mcfg, run_dir)
                else:
                    stale += 1
            if step % 20 == 0 or step == cfg.iterations:
                log.write(
                    strict_json(
                        {
                            "step": step,
                            "loss": float(loss.detach()),
                            **parts,
                            "val": last_val,
                            "lr": lr_at(cfg, step),
                            "it_s": speed,
                        }
                    )
                    + "\n"
                )
                log.flush()
            bar.update(task, completed=done(), step=step, loss=float(loss.detach()), val=last_val, speed=speed)
            if step % cfg.ckpt_every == 0 or step == cfg.iterations:
                checkpoint()
            if out_of_time:
                break
            if patience and ctx.any_true(stale >= patience):  # every rank validated the same weights: agreed anyway
                stopped_early = True
                break
        checkpoint()
    log.close()
    seconds = time.monotonic() - t0
    return {
        "task": cfg.task,
        "step": step,
        "iterations": cfg.iterations,
        "val": last_val,
        "best_val": best,
        "seconds": seconds,
        "seconds_total": spent_before + seconds,
        "it_per_s": (step - start_step) / max(seconds, 1e-9),
        "stopped_early": stopped_early,
        "stale_validations": stale,
    }
