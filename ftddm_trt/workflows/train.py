"""Train, fine-tune, add a fine-mask estimator: the logic behind `ftddm-trt train`, `finetune` and
`add-fine-mask` (process groups under torchrun, the command lines recorded in a model's manifest, the
validation report).

``TrainingError`` names why a run cannot go on; the trainers' own errors (``ValueError``, ``OSError``,
``data.nifti.files.InputError``) propagate for the CLI to name.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from ftddm_trt.atomic import check_output
from ftddm_trt.workflows.console import console


class TrainingError(Exception):
    """A training run refused (bad configuration, missing files); the message names why."""


def run_training(cfg, run_dir: Path, max_minutes: float | None, device: str, init_from: Path | None,
                 patience: int) -> dict | None:
    """Train (or resume) ``cfg`` (``training.trainer.TrainConfig``) in ``run_dir``, across processes under
    torchrun; returns the summary with ``processes`` on the main process, None on the others.

    TrainingError names a bad configuration or missing file (prefixed by the rank under torchrun)."""
    from ftddm_trt.training.distributed import init_from_env
    from ftddm_trt.training.trainer import train

    ctx = init_from_env(device)
    try:
        summary = train(cfg, run_dir, max_minutes=max_minutes, device=device, init_from=init_from, dist_ctx=ctx,
                        patience=patience)
    except (ValueError, FileNotFoundError) as err:
        raise TrainingError(f"rank {ctx.rank}: {err}" if ctx.enabled else str(err)) from err
    finally:
        ctx.shutdown()
    return {**summary, "processes": ctx.world_size} if ctx.is_main else None


def finetune_command(cfg, force: bool = False) -> str:
    """The `ftddm-trt finetune` command line that reproduces ``cfg`` (recorded in the manifest)."""
    command = ["ftddm-trt", "finetune", "--data", str(cfg.data_dir), "--out", str(cfg.out_model),
               "--minutes", f"{cfg.minutes:g}", "--networks", ",".join(cfg.networks),
               "--learning-rate", f"{cfg.lr:g}", "--lr-mask-fraction", f"{cfg.lr_fraction:g}",
               "--fine-mask-share", f"{cfg.fine_mask_share:g}", "--margin-weight", f"{cfg.margin_weight:g}",
               "--val-subjects", str(cfg.val_subjects), "--qc-convention", cfg.qc_convention]
    command += (["--model", str(cfg.base_model)] if cfg.base_model else []) + \
               (["--work", str(cfg.work_dir)] if cfg.work_dir else [])
    return shlex.join(command + (["--force"] if force else []))


def run_finetune(cfg, force: bool = False) -> dict:
    """Fine-tune ``cfg`` (``training.finetune.FinetuneConfig``), across processes under torchrun; returns
    the written manifest ({} on a torchrun rank other than 0: rank 0 reports and writes).

    The output folder is checked (``atomic.check_output``, OutputError) before any training."""
    from ftddm_trt.training.distributed import init_from_env
    from ftddm_trt.training.finetune import finetune

    check_output(cfg.out_model, force, (cfg.data_dir, cfg.base_model, cfg.work_dir))
    ctx = init_from_env("auto")
    try:
        return finetune(cfg, command=finetune_command(cfg, force), force=force, log=console.print, dist_ctx=ctx)
    finally:
        ctx.shutdown()


def finetune_report(manifest: dict, qc_convention: str) -> list[str]:
    """What a fine-tuning run scored on its validation subjects, as lines for the console: the PSNR of
    zero-filling, the base and the fine-tuned model at s = 8 and 4, the fine-mask estimator's threshold and
    weight, and the sampler settings that scored best."""
    lines = []
    quality = manifest["finetune"]["validation_quality"]
    for key in ("s=8", "s=4"):
        if key in quality:
            q = quality[key]
            lines.append(
                f"validation ({quality['maps']} maps, lr protocol, qc {qc_convention}) {key}: zero-filled "
                f"{q['zero-filled']['psnr']:.2f} dB, "
                f"base {q['base']['psnr']:.2f} dB ({q['base']['psnr_gain']:+.2f}), "
                f"fine-tuned {q['finetuned']['psnr']:.2f} dB ({q['finetuned']['psnr_gain']:+.2f})"
            )
    if quality.get("fine_mask"):
        fm = quality["fine_mask"]
        lines.append(f"fine-mask estimator fine-tuned: threshold {fm['threshold']:g}, qc weight {fm['weight']:g} "
                     "(chosen on the validation subjects; upscale --model uses them)")
    rec = quality.get("recommended")
    if rec:
        lines.append(
            f"best sampler settings on the validation subjects: --passes {rec['passes']} --qc-consistency "
            f"{rec['qc_consistency']:g} (mean gain {rec['psnr_gain']:+.2f} dB at s = 8 and 4); pass them to upscale"
        )
    return lines


def run_add_fine_mask(out_model: Path, base: Path | None, minutes: float, data: Path | None = None,
                      val_subjects: int = 2, subjects: int = 45, data_seed: int = 0,
                      styles: Sequence[str] = ("classic", "smooth", "patchy"), force: bool = False) -> dict:
    """Train the fine-mask estimator of model ``base`` (default: the shipped model) on a site's subjects
    (``data``, the last ``val_subjects`` held out) or on phantoms (``subjects``, ``data_seed``, ``styles``),
    and write ``out_model``; returns its manifest. The output folder is checked before any training."""
    from ftddm_trt.training.fine_mask import add_fine_mask

    check_output(out_model, force, (base, data))
    if data is not None:
        from ftddm_trt.data.training_folder import folder_sha256, read_training_folder, split_subjects

        train_subj, val_subj = split_subjects(read_training_folder(data), val_subjects)
        record = {"data_dir": str(data.resolve()), "data_sha256": folder_sha256(data)}
    else:
        from ftddm_trt.training.trainer import TrainConfig, training_subjects

        train_subj, val_subj = training_subjects(
            TrainConfig(n_subjects=subjects, data_seed=data_seed, styles=tuple(styles))
        )
        record = {"phantoms": {"subjects": subjects, "data_seed": data_seed, "styles": list(styles)}}
    record["subjects"] = {"train": len(train_subj), "validation": len(val_subj)}
    command = ["ftddm-trt", "add-fine-mask", "--out", str(out_model), "--minutes", f"{minutes:g}"]
    command += ["--model", str(base)] if base else []
    command += ["--data", str(data), "--val-subjects", str(val_subjects)] if data else \
        ["--subjects", str(subjects), "--data-seed", str(data_seed), *[a for s in styles for a in ("--style", s)]]
    return add_fine_mask(base, out_model, train_subj, val_subj, minutes,
                         shlex.join(command + (["--force"] if force else [])), record, force=force, log=console.print)


def run_distill(model: Path | None, out: Path, work: Path | None, cfg, force: bool = False) -> dict:
    """Distil ``model`` (default: the shipped model) into the model folder ``out``: refuse a bad ``out`` before
    any work, train the student in ``work`` (default: ``OUT.runs`` beside ``out``; resumable), then package.
    Returns the written manifest."""
    from ftddm_trt.models.model_set import SHIPPED_MODEL_DIR
    from ftddm_trt.training.distill import distill, is_distilled_slot, package_distilled

    out = Path(out)
    model_input = None if is_distilled_slot(model or SHIPPED_MODEL_DIR, out) else model
    check_output(out, force, (model_input, work, cfg.data_dir))
    work = Path(work) if work is not None else out.with_name(out.name + ".runs")
    summary = distill(model, work, cfg, log=console.print)
    console.print(f"distilled in {summary['seconds'] / 60:.1f} min ({summary['steps']} steps): the student's output "
                  f"is {summary['psnr_vs_teacher']:.2f} dB PSNR from the teacher's on the validation maps")
    command = "ftddm-trt distill " + shlex.join(
        [*(["--model", str(model)] if model else []), "--out", str(out), "--steps", str(cfg.steps),
         "--minutes", f"{cfg.minutes:g}"])
    return package_distilled(model, work, out, cfg, commands=[command], force=force)
