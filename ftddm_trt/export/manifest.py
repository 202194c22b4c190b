"""The export manifest: what was exported, from which weights, and how closely it matches PyTorch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ftddm_trt.integrity import file_sha256  # noqa: F401  (re-exported: exporters import it from here)

MANIFEST_NAME = "manifest.json"




def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read ``folder/manifest.json``; a clear error if it is missing or not JSON."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not an export written by `ftddm-trt export`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
