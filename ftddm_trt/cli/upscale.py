"""`ftddm-trt upscale` (a subject folder -> 64x64 maps) and `ftddm-trt evaluate` (against a truth)."""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ftddm_trt import __version__
from ftddm_trt.cli.app import app
from ftddm_trt.atomic import publish_dir, staging_dir
from ftddm_trt.cli.common import check_output_dir, console, fail, parse_clip_x0, parse_lambda_min
from ftddm_trt.constants import HR_SIZE, METABOLITES, T_TRUNC
from ftddm_trt.diffusion.samplers.dpm_solver import DEFAULT_LAMBDA_MIN

#: CLI defaults of the two solver-safety settings (the SamplerSpec defaults).
CLIP_X0_DEFAULT = "0,3"
LAMBDA_MIN_DEFAULT = f"{DEFAULT_LAMBDA_MIN:g}"


@dataclass
class UpscaleOptions:
    """Everything `upscale` (and `demo`) lets a user choose."""

    backend: str = "onnxruntime"
    sampler: str = "ftddm-dpmpp"
    ttrunc: int = T_TRUNC
    steps: Optional[int] = None
    tau_d: float = 0.9
    tau_f: float = 0.9
    clip_x0: Optional[tuple[float, float]] = (0.0, 3.0)
    lambda_min: Optional[float] = DEFAULT_LAMBDA_MIN
    samples: int = 1
    metabolites: Optional[list[str]] = None
    seed: int = 0
    model: Optional[Path] = None
    onnx: Optional[Path] = None
    engines: Optional[Path] = None
    batch_size: int = 16
    url: Optional[str] = None
    scale: Optional[float] = None
    server_loop: bool = False


def upscale_to_folder(subject_dir: Path, out_dir: Path, opts: UpscaleOptions, force: bool = False) -> dict:
    """Read, super-resolve, write ``out_dir`` atomically; returns the run record (run.json).

    Errors exit non-zero through ``fail`` with nothing written to ``out_dir``.
    """
    from ftddm_trt.data.figures import report_figure
    from ftddm_trt.data.nifti_io import InputError, read_subject, write_maps
    from ftddm_trt.engine.factory import open_backend
    from ftddm_trt.engine.pipeline import SamplerSpec
    from ftddm_trt.engine.upscale import upscale_subject

    if not subject_dir.is_dir():
        fail(f"{subject_dir}: subject folder does not exist")
    check_output_dir(out_dir, force, inputs=(subject_dir,))
    try:
        spec = SamplerSpec(opts.sampler, ttrunc=opts.ttrunc, steps=opts.steps, tau_d=opts.tau_d, tau_f=opts.tau_f,
                           clip_x0=opts.clip_x0, lambda_min=opts.lambda_min)
    except ValueError as err:
        fail(str(err))
    if opts.samples < 1:
        fail(f"--samples must be >= 1, got {opts.samples}")
    if opts.server_loop and opts.backend != "triton":
        fail("--server-loop needs --backend triton (the loop runs inside Triton's ftddm_sampler model)")
    flow_ttrunc = spec.ttrunc if spec.uses_flow else None
    if opts.backend in ("torch", "onnxruntime") and opts.onnx is None:
        from ftddm_trt.models.model_set import ModelSet

        try:
            ModelSet.open(opts.model, flow_ttrunc, start=spec.start_network or "flow")  # a flow trained for this Ttrunc must exist
        except FileNotFoundError as err:
            fail(str(err))
    try:
        subject = read_subject(subject_dir)
    except InputError as err:
        fail(str(err))
    if opts.scale is not None and abs(opts.scale - subject.scale) > 1e-3:
        fail(f"--scale {opts.scale} does not match the data: {subject.n}x{subject.n} maps give s = {subject.scale:.3f}")
    if opts.metabolites:
        unknown = [m for m in opts.metabolites if m not in subject.metabolites]
        if unknown:
            fail(f"{subject_dir}: no maps for {', '.join(unknown)} (present: {', '.join(subject.metabolites)})")
        keep = [subject.metabolites.index(m) for m in opts.metabolites]
        subject.lr, subject.mask = subject.lr[:, keep], subject.mask[:, keep]
        subject.metabolites = tuple(opts.metabolites)

    try:
        backend = open_backend(opts.backend, model=opts.model, onnx_dir=opts.onnx, engine_dir=opts.engines,
                               url=opts.url, ttrunc=flow_ttrunc, log=console.print, start=spec.start_network or "flow")
    except Exception as err:  # every runtime has its own errors: report them by name
        fail(f"cannot open backend {opts.backend!r}: {err}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    tmp = staging_dir(out_dir)
    try:
        with backend, Progress(TextColumn("[bold]upscale"), BarColumn(), MofNCompleteColumn(), TextColumn("maps"),
                               TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("maps", total=subject.lr.shape[0] * subject.lr.shape[1] * opts.samples)
            result = upscale_subject(subject, backend, spec, batch_size=opts.batch_size, seed=opts.seed,
                                     samples=opts.samples, progress=lambda done, total: bar.update(task, completed=done),
                                     server_loop=opts.server_loop)
            backend_info = backend.describe()
        write_maps(tmp, result.maps, subject.affine_sr, kind=subject.kind, sd=result.sd, metabolites=subject.metabolites)
        record = {
            "ftddm_trt_version": __version__,
            "input": str(subject_dir.resolve()),
            "output": str(out_dir.resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "n": subject.n, "scale": subject.scale, "slices": subject.n_slices,
            "metabolites": list(subject.metabolites), "kind": subject.kind,
            "mask_source": subject.mask_source, "anatomy": result.condition.anatomy, "notes": subject.notes,
            "sampler": spec.to_dict(), "nfe": result.nfe, "samples": opts.samples, "seed": opts.seed,
            "batch_size": opts.batch_size, "backend": backend_info, "server_loop": opts.server_loop,
            "seconds": result.seconds, "seconds_per_map": result.seconds_per_slice, "timings": result.timings,
        }
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str))
        report_figure(tmp / "report.png", subject.lr, result.maps, subject.metabolites, sd=result.sd,
                      t1=subject.t1, flair=subject.flair,
                      title=f"{subject_dir.name}: {spec.name}, NFE {result.nfe}, s = {subject.scale:.2f}")
        publish_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (KeyboardInterrupt, SystemExit, typer.Exit)):
            raise
        fail(f"upscaling {subject_dir} failed, nothing written to {out_dir}: {type(err).__name__}: {err}")
    return record


@app.command("upscale")
def upscale_cmd(
    subject_dir: Path = typer.Argument(..., help="Subject folder in the FSL-MRS layout (concs/<kind>/<metab>.nii.gz, qc/, t1, flair)."),
    out_dir: Path = typer.Argument(..., help="Output folder (64x64xZ maps in the same layout, run.json, report.png)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime (embedded default), torch, tensorrt (GPU, needs --engines) or triton (needs --url)."),
    sampler: str = typer.Option("ftddm-dpmpp", help="ftddm, ftddm-dpmpp, ddpm, ddpm-respaced, dpmpp, flow or tdpm (baseline; needs tdpm.* in the model)."),
    ttrunc: int = typer.Option(T_TRUNC, help="Truncation point Ttrunc of the ftddm samplers."),
    steps: Optional[int] = typer.Option(None, help="Solver / respaced steps (default 20 for DPM-Solver++, 100 for respaced DDPM)."),
    tau_d: float = typer.Option(0.9, "--tau-d", help="Temperature (std factor) of the diffusion sampling noise."),
    tau_f: float = typer.Option(0.9, "--tau-f", help="Temperature of the flow's latent."),
    clip_x0: str = typer.Option(CLIP_X0_DEFAULT, "--clip-x0", help="LO,HI: clamp every predicted x0 (normalized units) to this range; none: no clamp."),
    lambda_min: str = typer.Option(LAMBDA_MIN_DEFAULT, "--lambda-min", help="dpmpp from noise: start where lambda(t) >= this (diffusers' lambda_min_clipped); none: start at T."),
    samples: int = typer.Option(1, help="Repeated samples; K > 1 writes their mean and uncertainties/<metab>_sd.nii.gz."),
    metabolites: Optional[str] = typer.Option(None, help=f"Comma-separated subset of {','.join(METABOLITES)} (default: all present)."),
    seed: int = typer.Option(0, help="Random seed (same seed, backend and batch size -> same output)."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the shipped model)."),
    onnx: Optional[Path] = typer.Option(None, help="ONNX export folder for --backend onnxruntime (default: export of --model, cached)."),
    engines: Optional[Path] = typer.Option(None, help="TensorRT engine folder for --backend tensorrt."),
    batch_size: int = typer.Option(16, help="Maps per network call (whole-volume batching)."),
    url: Optional[str] = typer.Option(None, help="Triton server HOST:GRPC_PORT for --backend triton."),
    scale: Optional[float] = typer.Option(None, help="Upscaling factor s; default inferred from the in-plane size (64/N)."),
    server_loop: bool = typer.Option(False, "--server-loop", help="With --backend triton: run the whole sampling loop inside the server (one request per batch)."),
    force: bool = typer.Option(False, help="Replace a non-empty OUT_DIR."),
) -> None:
    """Super-resolve a subject's N x N metabolite maps to 64 x 64 with FTDDM."""
    opts = UpscaleOptions(backend=backend, sampler=sampler, ttrunc=ttrunc, steps=steps, tau_d=tau_d, tau_f=tau_f,
                          clip_x0=parse_clip_x0(clip_x0), lambda_min=parse_lambda_min(lambda_min),
                          samples=samples, metabolites=[m.strip() for m in metabolites.split(",")] if metabolites else None,
                          seed=seed, model=model, onnx=onnx, engines=engines, batch_size=batch_size, url=url, scale=scale,
                          server_loop=server_loop)
    record = upscale_to_folder(subject_dir, out_dir, opts, force=force)
    console.print(f"[green]wrote[/] {out_dir}: {record['slices']} slices x {len(record['metabolites'])} metabolites, "
                  f"{record['sampler']['name']} NFE {record['nfe']}, {record['seconds_per_map']:.3f} s per map, mask from {record['mask_source']}")


def evaluate_folders(pred_dir: Path, truth_dir: Path, input_dir: Path | None = None) -> dict:
    """Metrics of a prediction folder against a truth folder (and of the zero-filled input when known)."""
    from ftddm_trt.data.evaluation import evaluate_volume
    from ftddm_trt.data.kspace import zero_fill
    from ftddm_trt.data.nifti_io import InputError, read_map_folder, read_subject

    try:
        pred, pred_aff, metabs = read_map_folder(pred_dir)
        truth, truth_aff, _ = read_map_folder(truth_dir, metabolites=metabs)
        masks_dir = truth_dir / "masks"
        if masks_dir.is_dir():
            mask, _, _ = read_map_folder(masks_dir, metabolites=metabs, subfolder=None)
            mask = mask > 0.5
        else:
            mask = truth > 0
    except InputError as err:
        fail(str(err))
    if pred.shape != truth.shape:
        fail(f"{pred_dir}: maps of shape {pred.shape} do not match the truth {truth_dir} {truth.shape}")
    if not np.allclose(pred_aff, truth_aff, atol=1e-3):
        fail(f"{pred_dir}: affine differs from the truth's ({truth_dir}); not the same grid")
    baselines = {}
    if input_dir is None and (pred_dir / "run.json").is_file():
        input_dir = Path(json.loads((pred_dir / "run.json").read_text())["input"])
    if input_dir is not None and input_dir.is_dir():
        try:
            subject = read_subject(input_dir)
            idx = [subject.metabolites.index(m) for m in metabs]
            baselines["zero-filled"] = zero_fill(subject.lr[:, idx], HR_SIZE)
        except (InputError, ValueError) as err:
            console.print(f"[yellow]no zero-filled baseline:[/] {err}")
    return evaluate_volume(pred, truth, mask, metabs, baselines)


@app.command("evaluate")
def evaluate_cmd(
    pred_dir: Path = typer.Argument(..., help="Output folder of `ftddm-trt upscale`."),
    truth_dir: Path = typer.Argument(..., help="Truth folder (concs/raw/<metab>.nii.gz at 64x64, masks/<metab>.nii.gz), e.g. SUBJECT/truth."),
    input_dir: Optional[Path] = typer.Option(None, "--input", help="The LR subject folder, for the zero-filled baseline (default: from run.json)."),
    out: Optional[Path] = typer.Option(None, help="Write the metrics as JSON to this file (default: PRED_DIR/metrics.json)."),
) -> None:
    """NRMSE / PSNR / SSIM per metabolite and overall, against the truth and the zero-filled baseline."""
    from ftddm_trt.data.evaluation import markdown_table

    result = evaluate_folders(pred_dir, truth_dir, input_dir)
    console.print(markdown_table(result), highlight=False)
    out = out or pred_dir / "metrics.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    console.print(f"[green]wrote[/] {out}")
