"""`ftddm-trt train`: train one FTDDM network on the phantom dataset (resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ftddm_trt.cli.app import app
from ftddm_trt.cli.common import console, fail


@app.command("train")
def train_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder: checkpoints (last/), best weights (best.*), log.jsonl. Re-running resumes."),
    task: str = typer.Option("unet", help="unet (t in 1..Ttrunc), unet_full (t in 1..T, DDPM baselines), flow, or tdpm (TDPM baseline's GAN generator of x_Ttrunc)."),
    preset: str = typer.Option("cpu", help="Network size: cpu (trains on a laptop CPU), paper (30 M + 20 M), tiny (tests)."),
    iterations: int = typer.Option(20_000, help="Total iterations of the run (a resumed run continues to this)."),
    batch_size: int = typer.Option(8, help="Maps per iteration."),
    lr: float = typer.Option(1e-4, help="Initial Adam learning rate (decays exponentially to --lr-final)."),
    lr_final: float = typer.Option(1e-5, help="Learning rate at the last iteration."),
    ttrunc: int = typer.Option(100, help="Truncation point Ttrunc."),
    subjects: int = typer.Option(25, help="Phantom subjects in the dataset (split 3/5 train, 1/5 val, 1/5 test)."),
    data_seed: int = typer.Option(0, help="Phantom dataset seed."),
    seed: int = typer.Option(0, help="Training seed (initialization, batches, noise)."),
    val_every: int = typer.Option(500, help="Validate (and keep the best weights) every N iterations."),
    max_minutes: float = typer.Option(0.0, help="Stop after this many minutes (0: no limit); re-run to resume."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    patience: int = typer.Option(0, help="Stop once this many validations in a row did not improve the best (0: never; not for tdpm)."),
    gan_l1: float = typer.Option(10.0, "--gan-l1", help="tdpm: weight of the generator's L1 term (its z = 0 output vs the centre of q(x_Ttrunc | x0))."),
    init_from: Path = typer.Option(None, "--init-from", help="Start from these weights (NAME.safetensors + NAME.json of the same task/preset), e.g. fine-tune a flow for another Ttrunc."),
) -> None:
    """Train (or resume) one network. Interrupt at any moment; the same command resumes."""
    from ftddm_trt.training.trainer import TASKS, TrainConfig, train

    if task not in TASKS:
        fail(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    cfg = TrainConfig(task=task, preset=preset, iterations=iterations, batch_size=batch_size, lr=lr, lr_final=lr_final,
                      t_trunc=ttrunc, n_subjects=subjects, data_seed=data_seed, seed=seed, val_every=val_every, gan_l1=gan_l1)
    try:
        summary = train(cfg, run_dir, max_minutes=max_minutes or None, device=device, init_from=init_from, patience=patience)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    console.print_json(json.dumps(summary))


@app.command("package-model")
def package_model_cmd(
    out: Path = typer.Option(..., "--out", help="Model folder to write (unet.*, unet_full.*, flow.*, manifest.json)."),
    unet: Path = typer.Option(None, help="Run folder of the truncated-range UNet."),
    unet_full: Path = typer.Option(None, "--unet-full", help="Run folder of the full-chain UNet (DDPM baselines)."),
    flow: Path = typer.Option(None, help="Run folder of the flow."),
    tdpm: Path = typer.Option(None, help="Run folder of the TDPM generator (baseline, `train --task tdpm`); becomes tdpm.*."),
    extra_flow: list[Path] = typer.Option([], "--extra-flow", help="Run folder of a flow trained for another Ttrunc (repeatable); becomes flow_t<Ttrunc>.*."),
    which: str = typer.Option("best", help="best (lowest validation loss) or last weights."),
    command: list[str] = typer.Option([], "--command", help="Training command lines to record in the manifest (repeatable)."),
    force: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Assemble a model folder from training runs (what `--model` and the shipped model are)."""
    from ftddm_trt.training.package import package_model

    runs = {k: v for k, v in (("unet", unet), ("unet_full", unet_full), ("flow", flow), ("tdpm", tdpm)) if v is not None}
    if not runs:
        fail("give at least one of --unet, --unet-full, --flow, --tdpm")
    try:
        manifest = package_model(runs, out, which=which, commands=list(command), force=force, extra_flows=list(extra_flow))
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        fail(str(err))
    console.print(f"[green]wrote[/] {out} with {', '.join(manifest['networks'])}")
