"""ONNX Runtime backend (the embedded default): runs the exported ONNX files in-process.

Reads an export folder written by ``ftddm-trt export`` (``unet.onnx``, ``unet_full.onnx``,
``flow.onnx``, and the baselines' ``munet.onnx`` / ``flow_enhancer.onnx`` when the model has them,
``manifest.json``). Input/output names are fixed by ``export.onnx_export``. An int8 export
(``ftddm-trt export --int8``: QDQ UNet graphs, ``export.int8``) is opened the same way; ``describe()`` reports
its precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftddm_trt.engine.backend import NETWORKS, Backend, MissingNetwork
from ftddm_trt.export.manifest import manifest_flow_ttrunc, manifest_precision, network_precisions, read_manifest
from ftddm_trt.integrity import verify_networks


def _session(path: Path, threads: int | None, providers: list[str] | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


class OnnxRuntimeBackend(Backend):
    """The networks of an ONNX export run in-process by ONNX Runtime (CPU by default; ``providers`` picks
    others), every graph hashed against the export manifest before its session is made."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: Path | str, threads: int | None = None, providers: list[str] | None = None) -> None:
        self.root = Path(onnx_dir)
        self.manifest = read_manifest(self.root)
        present = [n for n in NETWORKS if (self.root / f"{n}.onnx").is_file()]
        if not present:
            raise FileNotFoundError(f"{self.root} holds no ONNX network ({', '.join(n + '.onnx' for n in NETWORKS)})")
        # hash every graph against the manifest before it is loaded (IntegrityError on a mismatch);
        # the session then reads the very bytes whose hash describe() records
        self.onnx_sha256 = verify_networks(self.root, self.manifest, present)
        self.sessions = {n: _session(self.root / f"{n}.onnx", threads, providers) for n in present}

    @property
    def flow_ttrunc(self) -> int | None:
        """The flow's Ttrunc as the export manifest records it."""
        return manifest_flow_ttrunc(self.manifest, self.origin())

    def origin(self) -> str:
        """The export folder, for messages."""
        return f"the ONNX export {self.root}"

    def _run(self, name: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in self.sessions:
            raise MissingNetwork(f"the ONNX export {self.root} has no {name} network ({name}.onnx)")
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32) for k, v in feeds.items()}
        (out,) = self.sessions[name].run(None, arrays)
        return torch.from_numpy(out)

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """Predicted noise ``(B,1,64,64)`` from the ``unet`` (or ``unet_full``) graph."""
        return self._run("unet_full" if full else "unet", {"x_t": x_t, "y": y, "t": t, "s": s})

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """x_Ttrunc ``(B,1,64,64)`` from the ``flow`` graph."""
        return self._run("flow", {"eps": eps, "y": y, "tau_f": tau_f})

    def munet(self, y, s) -> torch.Tensor:
        """x0 ``(B,1,64,64)`` from the ``munet`` graph."""
        return self._run("munet", {"y": y, "s": s})

    def enhancer_reverse(self, eps, y, x_munet, tau_f) -> torch.Tensor:
        """The enhanced x0 ``(B,1,64,64)`` from the ``flow_enhancer`` graph."""
        return self._run("flow_enhancer", {"eps": eps, "y": y, "x_munet": x_munet, "tau_f": tau_f})

    def describe(self) -> dict[str, Any]:
        """The base facts plus the export's precision (``fp32``, or ``int8`` with each network's in
        ``network_precision``), each graph's sha256 and the weights' hashes of the manifest."""
        facts = {**super().describe(), "precision": manifest_precision(self.manifest), "onnx": dict(self.onnx_sha256),
                 "models": self.manifest.get("model_hashes", {})}
        if facts["precision"] != "fp32":
            precisions = network_precisions(self.manifest)
            facts["network_precision"] = {n: p for n, p in precisions.items() if n in self.sessions}
        return facts

    def close(self) -> None:
        """Drop the ONNX Runtime sessions."""
        self.sessions.clear()
