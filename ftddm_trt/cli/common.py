"""Small helpers every CLI command shares: error exits and output-folder checks."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)


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
