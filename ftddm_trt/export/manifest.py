"""The export manifest: what was exported, from which weights, and how closely it matches PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftddm_trt.atomic import write_text_atomic
from ftddm_trt.integrity import file_sha256  # noqa: F401  (re-exported: exporters import it from here)

MANIFEST_NAME = "manifest.json"


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    return write_text_atomic(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read ``folder/manifest.json``; a clear error if it is missing or not JSON."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not an export written by `ftddm-trt export`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


# -- the Ttrunc a flow was trained for ---------------------------------------------------------------
#: Manifest key (ONNX export, engine folder, Triton repository.json) of the truncation point the flow
#: was trained for: an int, or null when the model itself does not record it (then nothing is checked).
FLOW_TTRUNC_KEY = "flow_ttrunc"


class TtruncMismatch(ValueError):
    """A Ttrunc was asked for that the flow of a model, export, engine folder or server was not trained for."""


def check_flow_ttrunc(recorded: int | None, requested: int, where: str) -> None:
    """Refuse ``requested`` when ``where``'s flow was trained for another Ttrunc (``recorded``; None: unknown).

    The flow draws x_Ttrunc for its own Ttrunc only: a chain started elsewhere runs silently wrong
    (measured: 19.6 dB instead of 23.2 dB at s = 4 for --ttrunc 50 against the Ttrunc = 100 flow)."""
    if recorded is not None and int(recorded) != int(requested):
        raise TtruncMismatch(
            f"Ttrunc mismatch: the flow of {where} was trained for Ttrunc = {recorded}, not Ttrunc = {requested}. "
            f"Use --ttrunc {recorded}, or export the model's flow for Ttrunc = {requested} "
            f"(`ftddm-trt export --ttrunc {requested}`) and build from that export.")


def resolve_flow_ttrunc(recorded: int | None, requested: int | None, where: str) -> int | None:
    """The Ttrunc to record downstream of ``where``: ``recorded`` when known (``requested`` must then
    agree, else TtruncMismatch), else ``requested`` (None: still unknown)."""
    if requested is None:
        return None if recorded is None else int(recorded)
    check_flow_ttrunc(recorded, requested, where)
    return int(requested)


def manifest_flow_ttrunc(manifest: dict[str, Any], where: str) -> int | None:
    """The flow's Ttrunc a manifest records (None when the model did not record one).

    A manifest with a flow network but without the key was written before Ttrunc was recorded: that is
    refused (ValueError) rather than guessed."""
    if FLOW_TTRUNC_KEY not in manifest:
        if "flow" in manifest.get("networks", {}):
            raise TtruncMismatch(
                f"{where} does not record the Ttrunc its flow was trained for (written by an older "
                "ftddm-trt): re-export it with `ftddm-trt export` (and rebuild what was built from it)"
            )
        return None
    value = manifest[FLOW_TTRUNC_KEY]
    return None if value is None else int(value)


# -- precision -----------------------------------------------------------------------------------------
class UnsupportedPrecision(ValueError):
    """An export whose precision a consumer (a TensorRT build, a Triton repository) does not take."""


def manifest_precision(manifest: dict[str, Any]) -> str:
    """``int8`` for an export written by ``ftddm-trt export --int8``, else ``fp32`` (exports without the key)."""
    return str(manifest.get("precision", "fp32"))


def network_precisions(manifest: dict[str, Any]) -> dict[str, str]:
    """Network -> ``int8`` / ``fp32`` as an export's manifest records it."""
    return {n: str(info.get("precision", "fp32")) for n, info in manifest.get("networks", {}).items()}


def require_fp32_export(manifest: dict[str, Any], folder: Path, what: str) -> None:
    """Refuse (UnsupportedPrecision) an int8 export where ``what`` needs the fp32 graphs."""
    if manifest_precision(manifest) != "fp32":
        raise UnsupportedPrecision(
            f"{folder} is an int8 export (`ftddm-trt export --int8`), and {what} takes fp32 exports only: "
            "export the model without --int8 for it (int8 graphs run on --backend onnxruntime)")
