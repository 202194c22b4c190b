"""`ftddm-trt demo`: the main job end to end on the embedded default (no GPU, no server).

A phantom subject from the test split -> its N x N scan written as FSL-MRS files -> `upscale` with the
shipped model on ONNX Runtime -> `evaluate` against the subject's 64x64 truth -> a short table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.atomic import OutputError, atomic_dir
from ftddm_trt.cli.app import app
from ftddm_trt.cli.common import check_output_dir, console, fail
from ftddm_trt.cli.upscale import UpscaleOptions, evaluate_folders, upscale_to_folder
from ftddm_trt.constants import LR_SIZES
from ftddm_trt.integrity import strict_json


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(
        Path("demo_out"), help="Folder for the phantom subject, the super-resolved maps and the report."
    ),
    n: int = typer.Option(
        16, help=f"Acquired in-plane size N of the phantom scan (s = 64/N), one of {list(LR_SIZES)}."
    ),
    sampler: str = typer.Option("ftddm-dpmpp", help="Sampler (see `upscale --help`)."),
    steps: Optional[int] = typer.Option(None, help="Solver steps (default 20)."),
    backend: str = typer.Option("onnxruntime", help="Backend (see `upscale --help`)."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the shipped model)."),
    seed: int = typer.Option(0, help="Phantom and sampling seed."),
    hr_masks: bool = typer.Option(
        False, "--hr-masks", help="Give the 64x64 quality masks as input (the paper's protocol)."
    ),
    force: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Make a phantom subject, super-resolve it, evaluate it against its truth, print a table."""
    from ftddm_trt.data.nifti_io import write_phantom_subject
    from ftddm_trt.data.phantom import fold_split, make_subject, subject_index

    if n not in LR_SIZES:
        fail(f"--n must be one of {list(LR_SIZES)}, got {n}")
    check_output_dir(out, force, (model,))
    _, _, test_ids = fold_split()
    subject_id = test_ids[seed % len(test_ids)]
    subject = make_subject(subject_index(subject_id), seed=0)
    console.print(
        f"phantom subject {subject.subject_id} (test split): {subject.n_slices} slices, acquired {n}x{n}, s = "
        f"{64 / n:.2f}"
    )
    opts = UpscaleOptions(backend=backend, sampler=sampler, steps=steps, seed=seed, model=model)
    try:
        with atomic_dir(out, force, (model,), command="demo") as tmp:  # the whole demo folder appears at once
            staged_subject = write_phantom_subject(tmp / "input", subject, n, hr_masks=hr_masks)
            record = upscale_to_folder(staged_subject, tmp / "sr", opts)
            subject_dir = out / "input" / staged_subject.name
            record.update(input=str(subject_dir.resolve()), output=str((out / "sr").resolve()))
            (tmp / "sr" / "run.json").write_text(json.dumps(record, indent=2, default=str))
            result = evaluate_folders(tmp / "sr", staged_subject / "truth", staged_subject)
            (tmp / "metrics.json").write_text(strict_json(result, indent=2))
    except OutputError as err:
        fail(str(err))

    from rich.table import Table

    table = Table(title=f"{subject.subject_id}, s = {64 / n:.2f}, mask from {record['mask_source']}, backend {backend}")
    for col in ("method", "NFE", "s / map", "PSNR (dB)", "SSIM", "NRMSE", "coverage"):
        table.add_column(col, justify="right")
    overall = result["overall"]
    if "zero-filled" in overall:
        zf = overall["zero-filled"]
        table.add_row("zero-filled", "0", "-", f"{zf['psnr']:.2f}", f"{zf['ssim']:.3f}", f"{zf['nrmse']:.3f}", "-")
    pr = overall["prediction"]
    table.add_row(
        record["sampler"]["name"],
        str(record["nfe"]),
        f"{record['seconds_per_map']:.3f}",
        f"{pr['psnr']:.2f}",
        f"{pr['ssim']:.3f}",
        f"{pr['nrmse']:.3f}",
        f"{pr['coverage']:.3f}",
    )
    console.print(table)
    console.print(
        f"report picture: {out / 'sr' / 'report.png'}; maps: {out / 'sr' / 'concs'}; metrics: {out / 'metrics.json'}"
    )
