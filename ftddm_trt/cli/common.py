"""Small helpers every CLI command shares: error exits and output-folder checks."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from ftddm_trt.diffusion.samplers.dpm_solver import DEFAULT_LAMBDA_MIN
from ftddm_trt.workflows.console import console

__all__ = ["console", "fail", "check_output_dir", "parse_clip_x0", "parse_lambda_min", "CLIP_X0_DEFAULT",
           "LAMBDA_MIN_DEFAULT", "SHIPPED_MODEL"]

#: What `--model` reads when it is not given (its default, as the help shows it).
SHIPPED_MODEL = "the shipped model"

#: CLI defaults of the two solver-safety settings (the SamplerSpec defaults).
CLIP_X0_DEFAULT = "0,3"
LAMBDA_MIN_DEFAULT = f"{DEFAULT_LAMBDA_MIN:g}"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a red error line and exit with ``code`` (nothing else is written)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def check_output_dir(out: Path, force: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """Refuse, before any computation, an output folder that ``atomic.check_output`` refuses (non-empty
    without --force, not written by ftddm-trt, inside an input or holding one, '.', a mount point,
    a read-only parent, too long a name)."""
    from ftddm_trt.atomic import OutputError, check_output

    try:
        check_output(out, force, inputs)
    except OutputError as err:
        fail(str(err))


def parse_clip_x0(text: str) -> tuple[float, float] | None:
    """``--clip-x0 LO,HI`` or ``none`` -> ``(lo, hi)`` or None; a bad value exits with a named error."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--clip-x0 must be LO,HI (e.g. 0,3) or none, got {text!r}")
    if not (lo < hi and abs(lo) < float("inf") and abs(hi) < float("inf")):
        fail(f"--clip-x0 needs finite LO < HI, got {text!r}")
    return lo, hi


def parse_lambda_min(text: str) -> float | None:
    """``--lambda-min X`` or ``none`` -> X or None (DPM-Solver++ from noise starts where lambda(t) >= X)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        fail(f"--lambda-min must be a number or none, got {text!r}")
    if abs(value) == float("inf") or value != value:
        fail(f"--lambda-min must be finite (or none), got {text!r}")
    return value
