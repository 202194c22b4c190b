"""Small helpers every CLI command shares: error exits, output-folder checks, backend construction."""

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


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an existing ``out`` is swapped out, then removed."""
    import shutil

    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same filesystem, so the final move is a rename)."""
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    make_public(tmp)
    return tmp


def make_public(folder: Path) -> None:
    """Give a ``tempfile.mkdtemp`` folder (always 0700) the permissions of an ordinary new folder (umask)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
