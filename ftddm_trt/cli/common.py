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


def check_output_dir(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output folder that is non-empty (without --force) or that lies inside an input folder."""
    out = out.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents:
            fail(f"output folder {out} lies inside the input folder {src}; choose another place")
        if out in src.parents:  # replacing OUT (--force) would delete the input with it
            fail(f"input folder {src} lies inside the output folder {out}; choose another place")
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        fail(f"{out} is not empty; pass --force to replace its contents")
