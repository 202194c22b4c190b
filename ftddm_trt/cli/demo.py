"""`ftddm-trt demo`: the main job end to end on the embedded default (``workflows.demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import Command
from ftddm_trt.cli.common import SHIPPED_MODEL, fail
from ftddm_trt.constants import LR_SIZES
from ftddm_trt.workflows.demo import print_summary, run_demo
from ftddm_trt.workflows.evaluate import EvaluateError
from ftddm_trt.workflows.upscale import UpscaleError, UpscaleOptions


@app.command("demo", cls=Command, rich_help_panel="Use")
def demo_cmd(
    out: Path = typer.Option(
        Path("demo_out"), help="Folder for the phantom subject, the super-resolved maps and the report."
    ),
    n: int = typer.Option(
        16, help=f"Acquired in-plane size N of the phantom scan (s = 64/N), one of {list(LR_SIZES)}."
    ),
    sampler: str = typer.Option("auto", help="Sampler (see `upscale --help`)."),
    steps: Optional[int] = typer.Option(None, help="Solver steps.", show_default="20"),
    backend: str = typer.Option("onnxruntime", help="Backend (see `upscale --help`)."),
    model: Optional[Path] = typer.Option(None, help="Model folder to read.", show_default=SHIPPED_MODEL),
    seed: int = typer.Option(0, help="Phantom and sampling seed."),
    hr_masks: bool = typer.Option(
        False, "--hr-masks", help="Give the 64x64 quality masks as input (the paper's protocol).", show_default="off"
    ),
    force: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Make a phantom subject, super-resolve it, evaluate it against its truth, print a table."""
    opts = UpscaleOptions(backend=backend, sampler=sampler, steps=steps, seed=seed, model=model)
    try:
        demo = run_demo(out, n, opts, hr_masks=hr_masks, force=force)
    except (UpscaleError, EvaluateError, OutputError) as err:
        fail(str(err))
    print_summary(demo, out, backend)
