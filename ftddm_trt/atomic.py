"""Output folders that appear whole or not at all.

Everything is written into a staging folder beside the target (same filesystem), which replaces the
target with renames only when the writer finished. An interrupted or failed writer leaves the target
as it was and no partial folder behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def staging_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` with ordinary permissions (``mkdtemp`` alone makes it 0700)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished staging folder into place; an existing ``out`` is swapped out, then removed."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging folder that replaces ``out`` when the block ends without an exception.

    Refuses (FileExistsError) a non-empty ``out`` unless ``force``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace it")
    tmp = staging_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
