"""Integrity checks: files against their manifest hashes, outputs against non-finite values.

Every runtime file (ONNX graph, TensorRT engine) is hashed before it is loaded and compared with the
sha256 its manifest recorded when it was written; a mismatch is an ``IntegrityError`` naming the file
and both hashes, never a silent run. Outputs are checked for NaN / inf before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: The meaningful range of the sampling temperatures (std factors of the noise): 0 is deterministic,
#: 1 the trained distribution; beyond 2 the samples leave the data's range (1e30 gives NaN maps).
TAU_RANGE: tuple[float, float] = (0.0, 2.0)


class IntegrityError(RuntimeError):
    """A file differs from the sha256 its manifest records (corrupt, truncated or replaced)."""


class NonFiniteOutputError(RuntimeError):
    """A computation produced NaN or inf values; nothing is written."""


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path | str, expected_sha256: str | None, what: str = "file") -> str:
    """Hash ``path`` and compare with ``expected_sha256``; returns the hash (the one that will run).

    Raises IntegrityError when no hash is recorded or the file differs, FileNotFoundError if absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    if not expected_sha256:
        raise IntegrityError(
            f"IntegrityError: no sha256 is recorded for {what} {path}; cannot verify it (re-export it)"
        )
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise IntegrityError(f"IntegrityError: {what} {path} is corrupt or was replaced: sha256 {actual[:16]}... "
                             f"differs from the manifest's {expected_sha256[:16]}...; re-export it (delete the folder "
                             f"{path.parent} and run again)")
    return actual


def verify_networks(folder: Path, manifest: Mapping[str, Any], names: list[str], key: str = "onnx_sha256",
                    file_key: str = "onnx") -> dict[str, str]:
    """Verify ``folder/<manifest file of network>`` for every network in ``names``; network -> sha256."""
    networks = manifest.get("networks", {})
    hashes = {}
    for n in names:
        info = networks.get(n)
        if info is None:
            raise IntegrityError(f"IntegrityError: {folder} holds {n} but its manifest does not list it")
        hashes[n] = verify_file(Path(folder) / info.get(file_key, f"{n}.onnx"), info.get(key), what=f"{n} network")
    return hashes


def require_finite(array: np.ndarray, what: str) -> None:
    """Raise NonFiniteOutputError if ``array`` holds NaN or inf (says how many and where it came from)."""
    arr = np.asarray(array)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise NonFiniteOutputError(f"NonFiniteOutputError: {what} has {bad} of {arr.size} non-finite values (NaN/inf); "
                                   "nothing written (corrupt model files or extreme settings such as --tau-f)")


def check_temperature(name: str, value: float) -> None:
    """ValueError unless ``value`` is a finite temperature in TAU_RANGE."""
    lo, hi = TAU_RANGE
    if not (np.isfinite(value) and lo <= value <= hi):
        raise ValueError(
            f"{name} must be in [{lo:g}, {hi:g}] (a noise std factor: 0 deterministic, 1 as trained), got {value:g}"
        )


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) or isinstance(obj, np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON text that every parser accepts: NaN / inf (e.g. PSNR of a perfect prediction) become null."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)
