"""Writing evaluation and benchmark results: JSON (everything, with samples) and markdown (what a reader needs)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

#: The repository (or installed package's parent): paths under it are written relative to it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def portable_path(text: str) -> str:
    """An absolute path as written into results: relative to the project root when under it, ``$VENV/...`` under
    the Python environment, ``~/...`` under the home folder, else ``<abs>/NAME``; other strings unchanged."""
    if not (isinstance(text, str) and os.path.isabs(text) and "\n" not in text and " " not in text):
        return text
    p = Path(text)
    for root, label in ((PROJECT_ROOT, None), (Path(sys.prefix), "$VENV"), (Path.home(), "~")):
        try:
            rel = p.resolve().relative_to(root.resolve()) if p.exists() else p.relative_to(root)
        except ValueError:
            continue
        return rel.as_posix() if label is None else f"{label}/{rel.as_posix()}"
    return f"<abs>/{p.name}"


def portable(obj: Any) -> Any:
    """``obj`` with every absolute path string replaced by :func:`portable_path` (dict keys kept)."""
    if isinstance(obj, str):
        return portable_path(obj)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN written as null, absolute paths made portable), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(portable(obj)), indent=2, sort_keys=False) + "\n")
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (integers as is, None/NaN as a dash)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        if x == 0:
            return "0"
        if abs(x) < 1e-3:
            return f"{x:.{max(0, digits - 1)}e}"
        mag = math.floor(math.log10(abs(x)))
        decimals = max(0, digits - 1 - mag)
        return f"{x:.{decimals}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub markdown table (cells formatted with ``fmt``)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out
