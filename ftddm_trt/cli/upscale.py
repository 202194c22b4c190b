"""`ftddm-trt upscale` (a subject folder -> 64x64 maps): the options, parsed and handed to
``workflows.upscale``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import EXPERT, spellings
from ftddm_trt.cli.common import (
    CLIP_X0_DEFAULT,
    LAMBDA_MIN_DEFAULT,
    SHIPPED_MODEL,
    console,
    fail,
    parse_clip_x0,
    parse_lambda_min,
)
from ftddm_trt.constants import METABOLITES, T_TRUNC, USER_DEFAULT_TAU_F
from ftddm_trt.workflows.upscale import UpscaleError, UpscaleOptions, upscale_to_folder


def options_from_params(params: dict) -> UpscaleOptions:
    """UpscaleOptions from a command's parameters (the options ``upscale`` declares; others are ignored).

    The command-line strings are parsed here: --metabolites and --accept (comma-separated), --clip-x0
    (``LO,HI`` or none), --lambda-min (a number or none); a bad value exits with a named error."""
    from dataclasses import fields

    kw = {f.name: params[f.name] for f in fields(UpscaleOptions) if f.name in params}
    metabolites = kw.get("metabolites")
    if isinstance(metabolites, str):
        kw["metabolites"] = [m.strip() for m in metabolites.split(",")] if metabolites else None
    if isinstance(kw.get("accept"), str) or kw.get("accept") is None:
        text = kw.pop("accept", None)
        kw["accept"] = tuple(a.strip() for a in text.split(",") if a.strip()) if text else ()
    if isinstance(kw.get("clip_x0"), str):
        kw["clip_x0"] = parse_clip_x0(kw["clip_x0"])
    if isinstance(kw.get("lambda_min"), str):
        kw["lambda_min"] = parse_lambda_min(kw["lambda_min"])
    return UpscaleOptions(**kw)


@app.command("upscale", cls=spellings(positionals=("--out",)), rich_help_panel="Use")
def upscale_cmd(
    subject_dir: Path = typer.Argument(
        ..., help="Subject folder in the FSL-MRS layout (concs/<kind>/<metab>.nii.gz, qc/, t1, flair)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output folder (64x64xZ maps in the same layout, run.json, report.png)."
    ),
    backend: str = typer.Option(
        "onnxruntime",
        help="onnxruntime (embedded default), torch, tensorrt (GPU, needs --engines) or triton (needs --url).",
    ),
    sampler: str = typer.Option(
        "auto",
        help="auto: the model's distilled student (ftddm-distilled, flow + 1 to 3 UNet evaluations) where the model "
             "has one and runs from its folder (onnxruntime or torch, no --onnx) and no solver setting is given, else "
             "ftddm-dpmpp (flow + 20 DPM-Solver++ steps). Or name one: ftddm, ftddm-dpmpp, ddpm, ddpm-respaced, "
             "dpmpp, flow, tdpm (baseline; needs tdpm.* in the model), ftddm-distilled, munet (MUNet-FS-cWGAN "
             "baseline; needs munet.*) or flow-enhancer (Flow Enhancer baseline; needs munet.* and flow_enhancer.*).",
    ),
    ttrunc: int = typer.Option(T_TRUNC, help="Truncation point Ttrunc of the ftddm samplers.", **EXPERT),
    steps: Optional[int] = typer.Option(
        None, help="Solver / respaced steps.",
        show_default="20 for DPM-Solver++, 100 for respaced DDPM, the trained steps for ftddm-distilled"
    ),
    passes: int = typer.Option(
        1,
        help="ftddm-dpmpp: solver passes; each one after the first restarts the solver at Ttrunc from "
        "the previous output (passes x steps UNet calls). Helps a model fine-tuned on the data's kind "
        "(`ftddm-trt finetune` reports the count that scored best on its validation subjects).",
    ),
    tau_d: float = typer.Option(
        0.9, "--tau-d", help="Temperature (std factor) of the diffusion sampling noise, in [0, 2].", **EXPERT
    ),
    tau_f: float = typer.Option(
        USER_DEFAULT_TAU_F,
        "--tau-f",
        help="Temperature of the flow's latent, in [0, 2]: 0 (default) draws its mode, the deterministic "
             "highest-fidelity estimate; 0.9 is the paper's sampling temperature (needed for --samples K uncertainty).",
    ),
    clip_x0: str = typer.Option(
        CLIP_X0_DEFAULT,
        "--clip-x0",
        help="LO,HI: clamp every predicted x0 (normalized units) to this range; none: no clamp.",
        **EXPERT,
    ),
    lambda_min: str = typer.Option(
        LAMBDA_MIN_DEFAULT,
        "--lambda-min",
        help="dpmpp from noise: start where lambda(t) >= this (diffusers' lambda_min_clipped); none: start at T.",
        **EXPERT,
    ),
    sde: bool = typer.Option(
        False,
        "--sde",
        help="dpmpp / ftddm-dpmpp: the SDE form of DPM-Solver++ (diffusers' sde-dpmsolver++), fresh noise at each step "
             "scaled by --tau-d; the default ODE form is deterministic.",
        show_default="off",
        **EXPERT,
    ),
    samples: int = typer.Option(
        1, help="Repeated samples; K > 1 writes their mean and uncertainties/<metab>_sd.nii.gz."
    ),
    metabolites: Optional[str] = typer.Option(
        None, help=f"Comma-separated subset of {','.join(METABOLITES)}.", show_default="all present"
    ),
    seed: int = typer.Option(0, help="Random seed (same seed, backend and batch size -> same output)."),
    model: Optional[Path] = typer.Option(None, help="Model folder to read.", show_default=SHIPPED_MODEL),
    onnx: Optional[Path] = typer.Option(
        None, help="ONNX export folder for --backend onnxruntime.", show_default="the export of --model, cached"
    ),
    engines: Optional[Path] = typer.Option(
        None, help="TensorRT engine folder for --backend tensorrt.", show_default="none"
    ),
    batch_size: int = typer.Option(16, help="Maps per network call (whole-volume batching)."),
    url: Optional[str] = typer.Option(
        None, help="Triton server HOST:GRPC_PORT for --backend triton.", show_default="none"
    ),
    retry_s: float = typer.Option(
        30.0,
        "--retry-s",
        help="With --backend triton: keep retrying an unreachable or "
        "restarting server for this many seconds before failing (naming it).",
        **EXPERT,
    ),
    scale: Optional[float] = typer.Option(
        None, help="Upscaling factor s.", show_default="from the in-plane size, 64/N", **EXPERT
    ),
    server_loop: bool = typer.Option(
        False,
        "--server-loop",
        help="With --backend triton: run the whole sampling loop inside the server (one request per batch).",
        show_default="off",
        **EXPERT,
    ),
    kind: Optional[str] = typer.Option(
        None,
        "--kind",
        help="Concentration kind to read (raw, internal, molarity, molality), written to concs/<kind>.",
        show_default="every kind concs/ holds",
    ),
    allow_missing_anatomy: bool = typer.Option(
        False,
        "--allow-missing-anatomy",
        help="Run without t1 or flair: the missing condition channel is zeros (lower quality); recorded in run.json.",
        show_default="off",
    ),
    accept: Optional[str] = typer.Option(
        None,
        "--accept",
        help="Comma-separated degraded inputs to accept instead of "
        "refusing: zero-maps, out-of-range, empty-mask, missing-anatomy, partial-anatomy, below-breakpoint "
        "(maps smaller than the model's measured breakpoint, e.g. 4 x 4).",
        show_default="none",
    ),
    force: bool = typer.Option(
        False, help="Replace a non-empty --out folder written by ftddm-trt (never other files)."
    ),
    data_consistency: str = typer.Option(
        "auto",
        "--data-consistency",
        help="Keep the acquired k-space band of the output equal to the measurement: auto (when M is a 64x64 quality "
             "mask, the paper's protocol), on or off.",
        **EXPERT,
    ),
    qc_consistency: Optional[float] = typer.Option(
        None,
        "--qc-consistency",
        help="When M comes from the acquired grid and data consistency is off: put back this share (0-1) of the "
             "acquired k-space band through the model's fine-mask estimator (fine_mask.safetensors; a model without "
             "one has no qc step), per map only where it agrees better with the acquisition; 0: off. Recorded in "
             "run.json.",
        show_default="the share chosen with the estimator, 0.5 in the shipped model",
    ),
) -> None:
    """Super-resolve a subject's N x N metabolite maps to 64 x 64 with FTDDM.

    Degraded inputs (missing T1/FLAIR, several concentration kinds, all-zero, non-finite or out-of-range
    maps, empty quality masks) are refused with the reason named unless accepted explicitly."""
    opts = options_from_params(locals())
    try:
        record = upscale_to_folder(subject_dir, out, opts, force=force)
    except (UpscaleError, OutputError) as err:
        fail(str(err))
    console.print(
        f"[green]wrote[/] {out}: {record['slices']} slices x {len(record['metabolites'])} metabolites, "
        f"{record['sampler']['name']} NFE {record['nfe']} ({record['sampler_choice']}), "
        f"{record['seconds_per_map']:.3f} s per map, mask from "
        f"{record['mask_source']}"
    )
