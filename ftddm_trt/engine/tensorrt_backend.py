"""TensorRT backend: runs engines built by ``ftddm-trt build-engine`` on an NVIDIA GPU.

I/O are torch CUDA tensors bound by address (``set_tensor_address``) and run with
``execute_async_v3`` on each engine's own CUDA stream, ordered after torch's current stream
(``export.tensorrt_build.EngineRunner``), as in TensorRT's demo/Diffusion. The engine folder's
manifest says which engine serves which network and for which GPU and TensorRT version it was built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftddm_trt.engine.backend import Backend, MissingNetwork
from ftddm_trt.export.manifest import manifest_flow_ttrunc, read_manifest
from ftddm_trt.export.tensorrt_build import EngineRunner, require_tensorrt, tensorrt_major
from ftddm_trt.integrity import verify_networks


class TensorRTBackend(Backend):
    """The networks of an engine folder (``ftddm-trt build-engine``) run by TensorRT on the CUDA device;
    refuses engines built for another GPU or TensorRT version and verifies each engine's sha256 first."""

    name = "tensorrt"

    def __init__(self, engine_dir: Path | str) -> None:
        gpu = require_tensorrt()  # before any TensorRT runtime is touched
        import tensorrt as trt

        tensorrt_major(trt.__version__)
        self.root = Path(engine_dir)
        self.manifest = read_manifest(self.root)
        if self.manifest.get("gpu") != gpu or self.manifest.get("tensorrt_version") != trt.__version__:
            raise RuntimeError(
                f"engines in {self.root} were built for {self.manifest.get('gpu')} / TensorRT "
                f"{self.manifest.get('tensorrt_version')}, this is {gpu} / {trt.__version__}: rebuild them"
            )
        self.device = torch.device("cuda")
        self.engine_sha256 = verify_networks(self.root, self.manifest, list(self.manifest["networks"]),
                                             key="engine_sha256", file_key="engine")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {
            n: EngineRunner(runtime, self.root / info["engine"]) for n, info in self.manifest["networks"].items()
        }

    @property
    def flow_ttrunc(self) -> int | None:
        """The flow's Ttrunc as the engine manifest records it."""
        return manifest_flow_ttrunc(self.manifest, self.origin())

    def origin(self) -> str:
        """The engine folder, for messages."""
        return f"the TensorRT engine folder {self.root}"

    def _feeds(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, torch.float32).contiguous() for k, v in tensors.items()}

    def _engine(self, name: str) -> "EngineRunner":
        if name not in self.engines:
            raise MissingNetwork(f"the TensorRT engine folder {self.root} has no {name} engine")
        return self.engines[name]

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """Predicted noise ``(B,1,64,64)`` (on the GPU) from the ``unet`` (or ``unet_full``) engine."""
        return self._engine("unet_full" if full else "unet")(self._feeds(x_t=x_t, y=y, t=t, s=s), "eps")

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """x_Ttrunc ``(B,1,64,64)`` (on the GPU) from the ``flow`` engine."""
        return self._engine("flow")(self._feeds(eps=eps, y=y, tau_f=tau_f), "x")

    def munet(self, y, s) -> torch.Tensor:
        """x0 ``(B,1,64,64)`` (on the GPU) from the ``munet`` engine."""
        return self._engine("munet")(self._feeds(y=y, s=s), "x0")

    def enhancer_reverse(self, eps, y, x_munet, tau_f) -> torch.Tensor:
        """The enhanced x0 ``(B,1,64,64)`` (on the GPU) from the ``flow_enhancer`` engine."""
        return self._engine("flow_enhancer")(self._feeds(eps=eps, y=y, x_munet=x_munet, tau_f=tau_f), "x")

    def describe(self) -> dict[str, Any]:
        """The base facts plus precision, GPU, each engine's cache key and sha256, and the weights' hashes."""
        return {**super().describe(), "precision": self.manifest["precision"], "gpu": self.manifest["gpu"],
                "engines": {n: i["cache_key"] for n, i in self.manifest["networks"].items()},
                "engine_sha256": dict(self.engine_sha256),
                "models": self.manifest.get("model_hashes", {})}
