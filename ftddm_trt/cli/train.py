"""`ftddm-trt train`, `finetune`, `add-fine-mask` and `package-model`: the options, parsed and handed to
``workflows.train`` and ``training.package``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ftddm_trt import constants
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import EXPERT, spellings
from ftddm_trt.cli.common import SHIPPED_MODEL, check_output_dir, console, fail
from ftddm_trt.training import finetune_defaults
from ftddm_trt.workflows.train import TrainingError, finetune_report, run_add_fine_mask, run_finetune, run_training

_MARGIN_HELP = (
    "Loss weight of the voxels of M outside the truth's quality mask (in `lr`, M's dilated margin and low-SNR "
    "holes, never scored; 1: the paper's loss over all of M). Lower weights stop the networks learning an "
    "upward level bias. A run started before this option resumes with --margin-weight 1."
)
_LR_MASK_FRACTION_HELP = "Fraction of training maps given the `lr` mask protocol (the N x N qc mask a user has)."
#: Old spellings of the learning-rate options (``--lr`` is also the name of a mask protocol).
_LEARNING_RATE_SPELLINGS = {"--lr": "--learning-rate", "--lr-final": "--learning-rate-final",
                            "--lr-fraction": "--lr-mask-fraction"}
_DATA_LAYOUT = ("sub-*/concs/<kind>/<metab>.nii.gz, masks/<metab>.nii.gz or qc/<metab>_snr|_fwhm.nii.gz at 64 x 64, "
                "t1.nii.gz and flair.nii.gz on any grid")


@app.command("train", cls=spellings(_LEARNING_RATE_SPELLINGS, positionals=("--out",)), rich_help_panel="Train")
def train_cmd(
    out: Path = typer.Option(
        ..., "--out", help="Run folder: checkpoints (last/), best weights (best.*), log.jsonl. Re-running resumes."
    ),
    task: str = typer.Option(
        "unet",
        help="unet (t in 1..Ttrunc), unet_full (t in 1..T, DDPM baselines), flow, tdpm (TDPM baseline's GAN generator "
             "of x_Ttrunc), regression (the same UNet predicting the map in one evaluation: the conditional-mean "
             "yardstick), munet (MUNet-FS-cWGAN baseline, a conditional WGAN-GP) or flow_enhancer (Flow Enhancer "
             "baseline: a flow sharpening a trained MUNet's output; needs --munet).",
    ),
    preset: str = typer.Option(
        "cpu", help="Network size: cpu (trains on a laptop CPU), paper (30 M + 20 M), tiny (tests)."
    ),
    iterations: int = typer.Option(20_000, help="Total iterations of the run (a resumed run continues to this)."),
    batch_size: int = typer.Option(8, help="Maps per iteration."),
    learning_rate: float = typer.Option(
        1e-4, "--learning-rate", help="Initial Adam learning rate (decays exponentially to --learning-rate-final)."
    ),
    learning_rate_final: float = typer.Option(
        1e-5, "--learning-rate-final", help="Learning rate at the last iteration."
    ),
    ttrunc: int = typer.Option(100, help="Truncation point Ttrunc."),
    subjects: int = typer.Option(25, help="Phantom subjects in the dataset (split 3/5 train, 1/5 val, 1/5 test)."),
    data_seed: int = typer.Option(0, help="Phantom dataset seed.", **EXPERT),
    seed: int = typer.Option(0, help="Training seed (initialization, batches, noise)."),
    val_every: int = typer.Option(500, help="Validate (and keep the best weights) every N iterations."),
    max_minutes: float = typer.Option(0.0, help="Stop after this many minutes (0: no limit); re-run to resume."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    patience: int = typer.Option(
        0, help="Stop once this many validations in a row did not improve the best (0: never; not for tdpm)."
    ),
    gan_l1: float = typer.Option(
        10.0,
        "--gan-l1",
        help="tdpm: weight of the generator's L1 term (its z = 0 output vs the centre of q(x_Ttrunc | x0)).",
        **EXPERT,
    ),
    munet: Optional[Path] = typer.Option(
        None,
        "--munet",
        help="flow_enhancer: the trained MUNet it enhances (a `train --task munet` run folder, a model folder with "
             "munet.*, or NAME.safetensors).",
        show_default="none",
    ),
    gan_adv: float = typer.Option(
        0.01, "--gan-adv", help="munet: weight of the adversarial (Wasserstein) term against the pixel loss.", **EXPERT
    ),
    gan_gp: float = typer.Option(10.0, "--gan-gp", help="munet: weight of the critic's gradient penalty.", **EXPERT),
    critic_steps: int = typer.Option(
        1, "--critic-steps", help="munet: critic updates per generator update.", **EXPERT
    ),
    init_from: Optional[Path] = typer.Option(
        None,
        "--init-from",
        help="Start from these weights (NAME.safetensors + NAME.json of the same task/preset), e.g. fine-tune a flow "
             "for another Ttrunc.",
        show_default="a fresh initialization",
    ),
    style: list[str] = typer.Option(
        ["classic"],
        "--style",
        help="Phantom style (repeatable; subjects take them in turn): classic, ribbon, smooth, patchy.",
    ),
    lr_mask_fraction: float = typer.Option(0.5, "--lr-mask-fraction", help=_LR_MASK_FRACTION_HELP, **EXPERT),
    margin_weight: float = typer.Option(constants.MARGIN_WEIGHT, "--margin-weight", help=_MARGIN_HELP, **EXPERT),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Train on a site's own 64 x 64 subjects (the layout of `ftddm-trt finetune --data`) instead of phantoms.",
        show_default="phantoms",
    ),
    val_subjects: int = typer.Option(2, "--val-subjects", help="With --data: subjects held out for validation."),
    ema: float = typer.Option(
        0.0,
        "--ema",
        help="Keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: none): validation and "
             "best.* use it, as DDPM samples with averaged weights.",
        **EXPERT,
    ),
    shards: int = typer.Option(
        0,
        "--shards",
        help="Shards per global batch (0: one per process). The same shards give the same run on any number of "
             "processes dividing them.",
        **EXPERT,
    ),
) -> None:
    """Train (or resume) one network. Interrupt at any moment; the same command resumes.

    Across processes: `torchrun --nproc-per-node N -m ftddm_trt.cli.main train ...` (DDP; gloo on the
    CPU, NCCL with one GPU per process); --batch-size is the global batch; only rank 0 writes.
    """
    from ftddm_trt.training.trainer import TASKS, TrainConfig

    if task not in TASKS:
        fail(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        cfg = TrainConfig(
            task=task,
            preset=preset,
            iterations=iterations,
            batch_size=batch_size,
            lr=learning_rate,
            lr_final=learning_rate_final,
            t_trunc=ttrunc,
            n_subjects=subjects,
            data_seed=data_seed,
            seed=seed,
            val_every=val_every,
            gan_l1=gan_l1,
            gan_adv=gan_adv,
            gan_gp=gan_gp,
            critic_steps=critic_steps,
            munet=str(munet.resolve()) if munet is not None else None,
            styles=tuple(style),
            lr_protocol_fraction=lr_mask_fraction,
            margin_weight=margin_weight,
            val_subjects=val_subjects,
            data_dir=str(data.resolve()) if data is not None else None,
            ema=ema,
            extra={"shards": shards} if shards else {},
        )
        summary = run_training(cfg, out, max_minutes or None, device, init_from, patience)
    except (ValueError, TrainingError) as err:
        fail(str(err))
    if summary is not None:
        console.print_json(json.dumps(summary))


@app.command("finetune", rich_help_panel="Train",
             cls=spellings({**_LEARNING_RATE_SPELLINGS, "--from": "--model"}, positionals=("--data", "--out")))
def finetune_cmd(
    data: Path = typer.Option(..., "--data", help=f"A site's own 64 x 64 subjects: {_DATA_LAYOUT}."),
    out: Path = typer.Option(
        ..., "--out", help="Model folder to write (accepted by --model, export, build-engine, triton-repo)."
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder to start from.", show_default=SHIPPED_MODEL
    ),
    minutes: float = typer.Option(
        finetune_defaults.MINUTES,
        "--minutes",
        help="Training time budget, shared between the networks, over every run: re-running continues with what is "
             "left.",
    ),
    networks: str = typer.Option(
        ",".join(finetune_defaults.NETWORKS),
        "--networks",
        help="Comma-separated networks to fine-tune: unet (default), flow, unet_full "
        "(DDPM baselines). The rest are copied from the base. Fine-tuning the flow "
        "on a few subjects over-fitted them in our benchmark (docs/fine-tuning.md).",
    ),
    learning_rate: float = typer.Option(
        finetune_defaults.LR, "--learning-rate", help="Adam learning rate (constant)."
    ),
    lr_mask_fraction: float = typer.Option(
        finetune_defaults.LR_FRACTION, "--lr-mask-fraction", help=_LR_MASK_FRACTION_HELP, **EXPERT
    ),
    fine_mask_share: float = typer.Option(
        finetune_defaults.FINE_MASK_SHARE,
        "--fine-mask-share",
        help="Share of the budget that fine-tunes the base's fine-mask estimator on your quality masks (after the "
             "networks; 0: keep the base's).",
        **EXPERT,
    ),
    margin_weight: float = typer.Option(
        finetune_defaults.MARGIN_WEIGHT, "--margin-weight", help=_MARGIN_HELP, **EXPERT
    ),
    val_subjects: int = typer.Option(
        finetune_defaults.VAL_SUBJECTS,
        "--val-subjects",
        help="Subjects held out for validation (the last ones by name).",
    ),
    work: Optional[Path] = typer.Option(
        None,
        "--work",
        help="Folder of the resumable training runs; never inside --data.",
        show_default="OUT.runs beside --out",
    ),
    qc_convention: str = typer.Option(
        finetune_defaults.QC_CONVENTION,
        "--qc-convention",
        help="How your N x N qc maps are written, for the validation of the qc step: any (the mean over every "
             "convention), or one of ours, mean-k0, mean-k2, sample, min, hz-3t, sample-hz-7t, missing (docs: qc "
             "conventions).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out model folder.", show_default="off"),
) -> None:
    """Fine-tune the model on your own high-resolution data; write a complete model folder.

    Training pairs are made the way an acquisition makes them: k-space truncation to N x N (s = 2..8),
    the mask M from the acquired maps themselves (as upscale makes it), and N x N qc maps in every
    convention for the fine-mask estimator. Bad training folders are refused before any
    training starts. Interrupt at any time; the same command resumes.

    Across processes: `torchrun --nproc-per-node N -m ftddm_trt.cli.main finetune ...` (DDP, the
    networks one after another; only rank 0 writes).
    """
    from ftddm_trt.data.nifti.files import InputError
    from ftddm_trt.training.finetune import FinetuneConfig, parse_networks

    check_output_dir(out, force, (data, model, work))  # before any training (atomic.check_output)
    try:
        cfg = FinetuneConfig(
            data_dir=data,
            out_model=out,
            base_model=model,
            minutes=minutes,
            networks=parse_networks(networks),
            lr=learning_rate,
            fine_mask_share=fine_mask_share,
            lr_fraction=lr_mask_fraction,
            margin_weight=margin_weight,
            val_subjects=val_subjects,
            work_dir=work,
            qc_convention=qc_convention,
        )
        manifest = run_finetune(cfg, force=force)
    except InputError as err:
        fail(str(err))
    except (ValueError, OSError) as err:  # OSError: atomic.OutputError, missing files
        fail(str(err))
    if not manifest:  # a torchrun rank other than 0: rank 0 reports and writes
        return
    for line in finetune_report(manifest, cfg.qc_convention):
        console.print(line)
    console.print(f"[green]wrote[/] {out} ({', '.join(manifest['networks'])})")


@app.command("distill", rich_help_panel="Train")
def distill_cmd(
    out: Path = typer.Option(
        ...,
        "--out",
        help="Distilled model folder to write. Inside the model folder as distilled/, `upscale --sampler "
             "ftddm-distilled` finds it; elsewhere, give it as --model.",
    ),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder to distil.", show_default=SHIPPED_MODEL),
    steps: int = typer.Option(1, "--steps", help="UNet evaluations of the student after the flow (1 to 3)."),
    minutes: float = typer.Option(
        20.0, "--minutes", help="Training time budget over every run of the same --work (drawing the teacher's "
                                "outputs not counted)."
    ),
    bank_maps: int = typer.Option(1536, "--bank-maps", help="Teacher outputs drawn once to train on.", **EXPERT),
    learning_rate: float = typer.Option(5e-5, "--learning-rate", help="Adam learning rate (constant).", **EXPERT),
    lr_mask_fraction: float = typer.Option(0.5, "--lr-mask-fraction", help=_LR_MASK_FRACTION_HELP, **EXPERT),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Draw the maps from a site's own 64 x 64 subjects (the layout of `finetune --data`).",
        show_default="phantoms of the shipped model's training styles",
    ),
    work: Optional[Path] = typer.Option(
        None, "--work", help="Folder of the resumable run (teacher outputs, checkpoints).",
        show_default="OUT.runs beside --out",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out model folder.", show_default="off"),
) -> None:
    """Distil a model's solver sampler into a student that needs 1 to 3 UNet evaluations.

    The student starts from the model's UNet and learns to land, in --steps deterministic steps from the
    flow's draw, where the solver (ftddm-dpmpp: 20 DPM-Solver++ steps) lands. Interrupt at any time; the same
    command resumes. Run it with `upscale --sampler ftddm-distilled` (any backend; export, build-engine and
    triton-repo take the distilled folder as --model).
    """
    from ftddm_trt.training.distill import DistillConfig
    from ftddm_trt.workflows.train import run_distill

    try:
        cfg = DistillConfig(steps=steps, minutes=minutes, bank_maps=bank_maps, lr=learning_rate,
                            lr_protocol_fraction=lr_mask_fraction, data_dir=str(data) if data is not None else None)
        manifest = run_distill(model, out, work, cfg, force=force)
    except (ValueError, OSError) as err:
        fail(str(err))
    record = manifest.get("distilled", {})
    console.print(f"wrote {out}: student of {record.get('teacher')} in {steps} step(s) "
                  f"(NFE {steps + 1} with the flow)")


@app.command("add-fine-mask", cls=spellings({"--from": "--model"}, positionals=("--out",)), rich_help_panel="Train")
def add_fine_mask_cmd(
    out: Path = typer.Option(
        ..., "--out", help="Model folder to write: the --model folder's files plus fine_mask.safetensors / .json."
    ),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder to add the estimator to.", show_default=SHIPPED_MODEL
    ),
    minutes: float = typer.Option(20.0, "--minutes", help="Training time of the estimator."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Train on a site's own subjects (the layout of `finetune --data`) instead of phantoms.",
        show_default="phantoms",
    ),
    subjects: int = typer.Option(
        45, "--subjects", help="Phantom subjects (train and validation folds; the shipped model's training used 45)."
    ),
    data_seed: int = typer.Option(
        0, "--data-seed", help="Phantom dataset seed (the shipped model's training used 0).", **EXPERT
    ),
    style: list[str] = typer.Option(
        ["classic", "smooth", "patchy"], "--style", help="Phantom styles, round-robin (repeat the option)."
    ),
    val_subjects: int = typer.Option(
        2,
        "--val-subjects",
        help="With --data: subjects held out to choose threshold and weight (the last ones by name).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out model folder.", show_default="off"),
) -> None:
    """Train the fine-mask estimator of a model and write the model with it.

    In the `lr` protocol (qc maps on the acquired grid) `upscale` puts part of the acquired k-space band
    back through an estimate of the 64 x 64 quality mask. This small network estimates that mask from the
    zero-filled map, T1, FLAIR and the qc maps; its threshold and qc weight are then chosen on validation
    subjects with the model's own networks, and `upscale --model OUT` uses them.
    """
    from ftddm_trt.data.nifti.files import InputError

    check_output_dir(out, force, (model, data))
    try:
        manifest = run_add_fine_mask(out, model, minutes, data=data, val_subjects=val_subjects,
                                     subjects=subjects, data_seed=data_seed, styles=style, force=force)
    except InputError as err:
        fail(str(err))
    except (ValueError, OSError) as err:
        fail(str(err))
    fm = manifest["networks"]["fine_mask"]
    console.print(
        f"[green]wrote[/] {out}: fine-mask estimator ({fm['training']['iterations']} iterations), threshold "
        f"{fm['threshold']:g}, qc weight {fm['consistency_weight']:g}"
    )


@app.command("package-model", cls=spellings({"--base": "--model"}), rich_help_panel="Train")
def package_model_cmd(
    out: Path = typer.Option(..., "--out", help="Model folder to write (unet.*, unet_full.*, flow.*, manifest.json)."),
    unet: Optional[Path] = typer.Option(None, help="Run folder of the truncated-range UNet.", show_default="none"),
    unet_full: Optional[Path] = typer.Option(
        None, "--unet-full", help="Run folder of the full-chain UNet (DDPM baselines).", show_default="none"
    ),
    flow: Optional[Path] = typer.Option(None, help="Run folder of the flow.", show_default="none"),
    tdpm: Optional[Path] = typer.Option(
        None, help="Run folder of the TDPM generator (baseline, `train --task tdpm`); becomes tdpm.*.",
        show_default="none",
    ),
    munet: Optional[Path] = typer.Option(
        None, help="Run folder of the MUNet-FS-cWGAN baseline (`train --task munet`); becomes munet.*.",
        show_default="none",
    ),
    flow_enhancer: Optional[Path] = typer.Option(
        None, "--flow-enhancer",
        help="Run folder of the Flow Enhancer baseline (`train --task flow_enhancer`); becomes flow_enhancer.*. "
             "Its MUNet must be in the folder too (--munet, or --model).",
        show_default="none",
    ),
    extra_flow: list[Path] = typer.Option(
        [],
        "--extra-flow",
        help="Run folder of a flow trained for another Ttrunc (repeatable); becomes flow_t<Ttrunc>.*.",
        show_default="none",
    ),
    which: str = typer.Option("best", help="best (lowest validation loss) or last weights."),
    command: list[str] = typer.Option(
        [], "--command", help="Training command lines to record in the manifest (repeatable).", show_default="none"
    ),
    model: Optional[Path] = typer.Option(
        None,
        "--model",
        help="Model folder whose networks not given as runs are copied as they are (marked from_base in the manifest).",
        show_default="none: only the runs given",
    ),
    force: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Assemble a model folder from training runs (what `--model` and the shipped model are)."""
    from ftddm_trt.training.package import package_model

    given = (("unet", unet), ("unet_full", unet_full), ("flow", flow), ("tdpm", tdpm), ("munet", munet),
             ("flow_enhancer", flow_enhancer))
    runs = {k: v for k, v in given if v is not None}
    if not runs:
        fail("give at least one of --unet, --unet-full, --flow, --tdpm, --munet, --flow-enhancer")
    try:
        manifest = package_model(
            runs, out, which=which, commands=list(command), force=force, extra_flows=list(extra_flow), base=model
        )
    except (OSError, ValueError) as err:  # OSError: atomic.OutputError, missing run files
        fail(str(err))
    console.print(f"[green]wrote[/] {out} with {', '.join(manifest['networks'])}")
