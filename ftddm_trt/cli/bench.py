"""`ftddm-trt bench`: quality versus NFE on the phantom test split (paper Table 1, Figs. 5-7;
``workflows.bench``).

Its defaults are the settings of the committed ``benchmarks/results/quality.*`` (``make bench`` runs it
with them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftddm_trt.cli.app import app
from ftddm_trt.cli.command import EXPERT, Command
from ftddm_trt.cli.common import (
    CLIP_X0_DEFAULT,
    LAMBDA_MIN_DEFAULT,
    SHIPPED_MODEL,
    console,
    fail,
    parse_clip_x0,
    parse_lambda_min,
)
from ftddm_trt.workflows.bench import BenchError, run_quality_bench


@app.command("bench", cls=Command, rich_help_panel="Measure")
def bench_cmd(
    out: Path = typer.Option(
        Path("benchmarks/results"),
        help="Folder for quality.json, quality.md and the figures (quality_vs_nfe.png, quality_vs_s.png, "
             "quality_tau_d.png).",
    ),
    model: Optional[Path] = typer.Option(None, help="Model folder to read.", show_default=SHIPPED_MODEL),
    backend: str = typer.Option("onnxruntime", help="Backend every method runs on (one backend, one run)."),
    maps: int = typer.Option(
        32,
        help="Test-split maps per (s, protocol), the same for every method (32: one batch; the whole bench takes about "
             "45 minutes on 2 CPU cores).",
    ),
    ddpm_maps: int = typer.Option(
        0,
        help="Maps DDPM T=1000 runs on: the first of --maps (0: all of them; it costs about as much as every other row "
             "together). A subset is stated in the table, which compares every method on it.",
        **EXPERT,
    ),
    batch_size: int = typer.Option(32, help="Maps per network call."),
    no_ddpm: bool = typer.Option(False, "--no-ddpm", help="Skip DDPM T=1000.", show_default="off"),
    stem: str = typer.Option("quality", help="File name stem of the results.", **EXPERT),
    clip_x0: str = typer.Option(
        CLIP_X0_DEFAULT, "--clip-x0", help="LO,HI clamp of every predicted x0 for every method, or none.", **EXPERT
    ),
    lambda_min: str = typer.Option(
        LAMBDA_MIN_DEFAULT, "--lambda-min", help="DPM-Solver++ from noise starts where lambda(t) >= this, or none.",
        **EXPERT,
    ),
    tau_d_sweep: str = typer.Option(
        "0,0.5,0.9,1.0,1.2", "--tau-d-sweep", help="Fig. 7: tau_d values for FTDDM Ttrunc=100 at s = 4 (empty: skip).",
        **EXPERT,
    ),
    s_sweep: str = typer.Option(
        "2,4,8", "--s-sweep", help="Fig. 6: s told to the networks on the s = 4 inputs (empty: skip).", **EXPERT
    ),
    seed: int = typer.Option(0, help="Seed of the map choice and of the samplers."),
) -> None:
    """Run every sampler on the same test maps at s = 8, 4, 2 for both mask protocols; write JSON, markdown, PNG."""
    try:
        sweeps = {
            name: tuple(float(v) for v in text.split(",") if v.strip())
            for name, text in (("tau_d", tau_d_sweep), ("s", s_sweep))
        }
    except ValueError:
        fail("--tau-d-sweep and --s-sweep take comma-separated numbers")
    command = {"maps": maps, "ddpm_maps": ddpm_maps, "batch_size": batch_size, "backend": backend,
               "clip_x0": clip_x0, "lambda_min": lambda_min, "tau_d_sweep": tau_d_sweep, "s_sweep": s_sweep,
               "seed": seed, "no_ddpm": no_ddpm}
    try:
        paths = run_quality_bench(out, model, backend, maps, ddpm_maps, batch_size, not no_ddpm, stem,
                                  parse_clip_x0(clip_x0), parse_lambda_min(lambda_min), sweeps["tau_d"], sweeps["s"],
                                  seed, command)
    except BenchError as err:
        fail(str(err))
    console.print(f"[green]wrote[/] {', '.join(str(p) for p in paths.values())}")
