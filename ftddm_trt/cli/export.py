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
    int8: bool = typer.Option(
        False, "--int8", help="int8 UNet graphs (ONNX Runtime QDQ, Conv layers), calibrated on the model's data; "
        "the quality loss in dB is measured and recorded.", show_default="off",
    ),
    calibration_data: Optional[Path] = typer.Option(
        None, "--calibration-data", show_default="phantoms",
        help="Training folder (sub-*/concs, masks or qc, t1, flair) to calibrate --int8 on.",
    ),
) -> None:
    """Export the networks to ONNX (opset 18, dynamic batch), check parity with PyTorch, write a manifest.

    The export is refused (nothing written) if ONNX Runtime and PyTorch disagree beyond the tolerance.
    With --int8 the UNets are quantized and refused if the solver sampler (ftddm-dpmpp) loses more than 0.5 dB of PSNR.
    """
    from ftddm_trt.atomic import OutputError
    from ftddm_trt.data.nifti.files import InputError
    from ftddm_trt.export.int8 import Int8Error
    from ftddm_trt.export.manifest import TtruncMismatch
    from ftddm_trt.export.onnx_export import ParityError
    from ftddm_trt.workflows.export import export_onnx

    if calibration_data is not None and not int8:
        fail("--calibration-data calibrates an int8 export: give --int8 with it")
    if calibration_data is not None and not calibration_data.is_dir():
        fail(f"--calibration-data {calibration_data} is not a folder")
    check_output_dir(out, force, (model, calibration_data))
    try:
        manifest = export_onnx(model, out, ttrunc=ttrunc, force=force, int8=int8, calibration_data=calibration_data,
                               log=console.print)
    except (FileNotFoundError, ParityError, OutputError, TtruncMismatch, Int8Error, InputError) as err:
        fail(str(err))
    precision = manifest.get("precision", "fp32")
    console.print(
        f"[green]exported[/] {', '.join(manifest['networks'])} to {out} ({precision}; "
        f"flow Ttrunc = {manifest['flow_ttrunc']})"
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
    from ftddm_trt.export.manifest import TtruncMismatch, UnsupportedPrecision
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
    except (TtruncMismatch, UnsupportedPrecision) as err:
        fail(str(err))
    except TensorRTUnavailable as err:
        fail(str(err), code=3)
    except (OutputError, IntegrityError) as err:
        fail(str(err))
    console.print(f"[green]engines[/] for {manifest['gpu']} in {out}")
