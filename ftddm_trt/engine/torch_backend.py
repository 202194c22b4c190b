"""PyTorch backend: the reference networks in eager mode (CPU, or CUDA when present).

``precision="bf16"`` runs the networks under CPU autocast (bfloat16 matmuls/convs, fp32 outputs);
``precision="fp16"`` does the same on CUDA. ``cuda_graph=True`` captures the UNet call per input
shape in a CUDA graph (static shapes only) and replays it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ftddm_trt.engine.backend import Backend, MissingNetwork
from ftddm_trt.models.model_set import ModelSet

PRECISIONS = ("fp32", "bf16", "fp16")


class _GraphedCall:
    """A network call captured in one CUDA graph per input-shape signature (static buffers)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple(tuple(a.shape) for a in args)
        if key not in self.graphs:
            static_in = [a.clone() for a in args]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph, as CUDA graphs require
                    self.fn(*static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, args):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()


class TorchBackend(Backend):
    """The networks of a model folder (``ModelSet``) run by PyTorch on ``device``, in fp32, bf16 or fp16
    (autocast), optionally with the UNets captured as CUDA graphs."""

    name = "torch"

    def __init__(
        self,
        models: ModelSet,
        device: str = "cpu",
        precision: str = "fp32",
        cuda_graph: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs device='cuda'")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 runs on CUDA only; use bf16 on the CPU")
        self.precision = precision
        self.models = models
        self.nets = {name: net.to(self.device).eval() for name, net in models.load_torch().items()}
        self._unet_calls = {name: self._wrap(self.nets[name]) for name in ("unet", "unet_full") if name in self.nets}
        self._flow_call = self._wrap(self.nets["flow"].reverse) if "flow" in self.nets else None
        self._munet_call = self._wrap(self.nets["munet"]) if "munet" in self.nets else None
        self._enhancer_call = self._wrap(self.nets["flow_enhancer"].enhance) if "flow_enhancer" in self.nets else None
        self.cuda_graph = cuda_graph
        if cuda_graph:
            self._unet_calls = {k: _GraphedCall(v) for k, v in self._unet_calls.items()}

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _wrap(self, fn):
        @torch.inference_mode()
        def call(*args: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return fn(*args).float()

        return call

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """Predicted noise ``(B,1,64,64)`` from the UNet (``full``: the one trained on the whole chain)."""
        name = "unet_full" if full else "unet"
        if name not in self._unet_calls:
            raise KeyError(f"the model set {self.models.root} has no {name!r} network")
        dev = self.device
        return self._unet_calls[name](x_t.to(dev), y.to(dev), t.to(dev, torch.float32), s.to(dev, torch.float32))

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """x_Ttrunc ``(B,1,64,64)`` from the flow (or the start network serving as ``flow``)."""
        if self._flow_call is None:
            raise KeyError(f"the model set {self.models.root} has no 'flow' network")
        dev = self.device
        return self._flow_call(eps.to(dev), y.to(dev), tau_f.to(dev, torch.float32))

    def _missing(self, name: str) -> MissingNetwork:
        return MissingNetwork(f"the model {self.models.root} has no {name} network ({name}.safetensors)")

    def munet(self, y, s) -> torch.Tensor:
        """x0 ``(B,1,64,64)`` from the model folder's MUNet (``munet.*``)."""
        if self._munet_call is None:
            raise self._missing("munet")
        return self._munet_call(y.to(self.device), s.to(self.device, torch.float32))

    def enhancer_reverse(self, eps, y, x_munet, tau_f) -> torch.Tensor:
        """The enhanced x0 ``(B,1,64,64)`` from the model folder's flow enhancer (``flow_enhancer.*``)."""
        if self._enhancer_call is None:
            raise self._missing("flow_enhancer")
        dev = self.device
        return self._enhancer_call(eps.to(dev), y.to(dev), x_munet.to(dev), tau_f.to(dev, torch.float32))

    @property
    def flow_ttrunc(self) -> int | None:
        """The Ttrunc of the model folder's flow (``ModelSet.flow_ttrunc``)."""
        return self.models.flow_ttrunc()

    def origin(self) -> str:
        """The model folder and its flow file, for messages."""
        return f"the model {self.models.root} ({self.models.flow_file})"

    def describe(self) -> dict[str, Any]:
        """The base facts plus precision, CUDA graphs and the sha256 of each network's weights."""
        return {**super().describe(), "precision": self.precision, "cuda_graph": self.cuda_graph,
                "models": self.models.hashes()}
