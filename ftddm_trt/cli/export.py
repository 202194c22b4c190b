"""`ftddm-trt export` (ONNX with parity) and `ftddm-trt build-engine` (TensorRT, GPU only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import Command
from ftddm_trt.cli.common import SHIPPED_MODEL, check_output_dir, console, fail


@app.command("export", cls=Command, rich_help_panel="Deploy")
def export_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for unet.onnx, unet_full.onnx, flow.onnx and manifest.json."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder to read (safetensors + JSON).", show_default=SHIPPED_MODEL
    ),
    ttrunc: Optional[int] = typer.Option(
        None,
        "--ttrunc",
        help="Export the flow trained for this Ttrunc; recorded in the manifest.",
        show_default="the model's main flow",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder.", show_default="off"),
) -> None:
    """Export the networks to ONNX (opset 18, dynamic batch), check parity with PyTorch, write a manifest.

    The export is refused (nothing written) if ONNX Runtime and PyTorch disagree beyond the tolerance.
    """
    from ftddm_trt.atomic import OutputError
    from ftddm_trt.export.manifest import TtruncMismatch
    from ftddm_trt.export.onnx_export import ParityError, export_model_set
    from ftddm_trt.models.model_set import ModelSet

    check_output_dir(out, force, (model,))
    try:
        models = ModelSet.open(model, ttrunc)
        manifest = export_model_set(models, out, force=force, log=console.print, flow_ttrunc=ttrunc)
    except (FileNotFoundError, ParityError, OutputError, TtruncMismatch) as err:
        fail(str(err))
    console.print(
        f"[green]exported[/] {', '.join(manifest['networks'])} to {out} (flow Ttrunc = {manifest['flow_ttrunc']})"
    )


@app.command("build-engine", cls=Command, rich_help_panel="Deploy")
def build_engine_cmd(
    onnx: Path = typer.Option(..., "--onnx", help="Export folder written by `ftddm-trt export`."),
    out: Path = typer.Option(..., "--out", help="Folder for the TensorRT engines, timing cache and manifest."),
    batch_size: int = typer.Option(16, help="Optimal batch of the optimization profile (whole-volume batching)."),
    precision: str = typer.Option("fp16", help="fp16 (norms/softmax kept in fp32) or fp32."),
    ttrunc: Optional[int] = typer.Option(
        None, "--ttrunc", help="Ttrunc the export's flow must have been trained for (checked, recorded).",
        show_default="the export's",
    ),
) -> None:
    """Build TensorRT engines into a new folder (NVIDIA GPU + TensorRT only; refuses clearly elsewhere).

    A non-empty --out is refused."""
    from ftddm_trt.atomic import OutputError
    from ftddm_trt.export.manifest import TtruncMismatch
    from ftddm_trt.export.tensorrt_build import PRECISIONS, TensorRTUnavailable, build_engines
    from ftddm_trt.integrity import IntegrityError

    if precision not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}")
    if not (onnx / "manifest.json").is_file():
        fail(f"{onnx} holds no manifest.json: not an export written by `ftddm-trt export`")
    check_output_dir(out, False, (onnx,))
    try:
        manifest = build_engines(
            onnx, out, batch_size=batch_size, precision=precision, log=console.print, flow_ttrunc=ttrunc
        )
    except TtruncMismatch as err:
        fail(str(err))
    except TensorRTUnavailable as err:
        fail(str(err), code=3)
    except (OutputError, IntegrityError) as err:
        fail(str(err))
    console.print(f"[green]engines[/] for {manifest['gpu']} in {out}")
