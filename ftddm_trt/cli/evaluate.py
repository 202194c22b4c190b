"""`ftddm-trt evaluate`: a prediction folder against its truth (``workflows.evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import Command
from ftddm_trt.cli.common import console, fail
from ftddm_trt.workflows.evaluate import EvaluateError, check_json_target, evaluate_folders, write_metrics


@app.command("evaluate", cls=Command, rich_help_panel="Use")
def evaluate_cmd(
    pred_dir: Path = typer.Argument(..., help="Output folder of `ftddm-trt upscale`."),
    truth_dir: Path = typer.Argument(
        ..., help="Truth folder (concs/raw/<metab>.nii.gz at 64x64, masks/<metab>.nii.gz), e.g. SUBJECT/truth."
    ),
    input_dir: Optional[Path] = typer.Option(
        None, "--input", help="The LR subject folder, for the zero-filled baseline.", show_default="from run.json"
    ),
    out: Optional[Path] = typer.Option(
        None,
        help="Write the metrics as JSON to this file (outside the folders read). Non-finite values (PSNR of a "
        "perfect match) are null.",
        show_default="JSON on stdout",
    ),
    force: bool = typer.Option(False, help="Replace an existing --out file."),
) -> None:
    """NRMSE / PSNR / SSIM per metabolite and overall, against the truth and the zero-filled baseline.

    Never writes into the folders it reads."""
    from ftddm_trt.evaluation.volumes import markdown_table
    from ftddm_trt.integrity import strict_json

    inputs = (pred_dir, truth_dir, input_dir)
    try:
        if out is not None:
            check_json_target(out, force, inputs)  # before computing
        result = evaluate_folders(pred_dir, truth_dir, input_dir)
        console.print(markdown_table(result), highlight=False)
        if out is None:
            typer.echo(strict_json(result, indent=2))
            return
        write_metrics(out, result, force, inputs)
    except (EvaluateError, OutputError) as err:
        fail(str(err))
    console.print(f"[green]wrote[/] {out}")
