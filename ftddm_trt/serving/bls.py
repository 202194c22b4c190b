"""The server-side sampler's engine: ``sample_batch`` over a Backend whose networks are BLS requests.

``ftddm_trt/serving/triton_templates/python/sampler.py`` (the ``ftddm_sampler`` model) wires Triton's ``pb_utils`` into
``BLSBackend`` through one ``infer(model, inputs, outputs)`` callable; everything else is here so that
it is testable without a server and so that the sampler math exists once
(``ftddm_trt.engine.pipeline.sample_batch``).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from ftddm_trt.engine.backend import Backend, MissingNetwork
from ftddm_trt.engine.model_check import check_same_model
from ftddm_trt.engine.pipeline import sample_batch
from ftddm_trt.engine.triton_backend import TRITON_MODELS, decode_sampler_request

#: ``infer(model_name, {input name: array}, [output names]) -> {output name: array}``
InferFn = Callable[[str, Mapping[str, np.ndarray], list[str]], Mapping[str, np.ndarray]]


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


def _col(t: torch.Tensor) -> np.ndarray:
    """(B,) -> (B, 1): a per-item scalar as Triton's dims [1] (reshaped to (B,) for the graph)."""
    return _f32(t).reshape(-1, 1)


class BLSBackend(Backend):
    """Runs ftddm_unet / ftddm_unet_full / ftddm_flow (and the baselines' ftddm_munet / ftddm_flow_enhancer)
    through ``infer`` (BLS inside Triton)."""

    name = "triton-bls"

    def __init__(self, infer: InferFn, models: Mapping[str, str] | None = None, flow_ttrunc: int | None = None,
                 weights: Mapping[str, str] | None = None) -> None:
        self.infer = infer
        self.models = dict(TRITON_MODELS if models is None else models)
        self.calls = 0
        self._flow_ttrunc = flow_ttrunc
        self.weights = dict(weights or {})  # network -> sha256 of the weights (the sampler's weights_sha256)

    def describe(self) -> dict:
        """The base facts plus ``models``: the sha256 of the weights each network was made from."""
        return {**super().describe(), "models": dict(self.weights)}

    @property
    def flow_ttrunc(self) -> int | None:
        """The Ttrunc of the repository's flow (the sampler's ``flow_ttrunc`` parameter): ``sample_batch``
        refuses requests for another one, so the server loop checks it as the client loop does."""
        return self._flow_ttrunc

    def origin(self) -> str:
        """This repository's sampler, for messages."""
        return "this Triton repository (ftddm_sampler)"

    def _call(self, network: str, inputs: dict[str, np.ndarray], output: str) -> torch.Tensor:
        if network not in self.models:
            raise MissingNetwork(f"the repository serves no model for network {network!r}")
        self.calls += 1
        out = self.infer(self.models[network], inputs, [output])[output]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def unet(self, x_t, y, t, s, full: bool = False) -> torch.Tensor:
        """Predicted noise ``(B,1,64,64)`` from a BLS request to the UNet model."""
        return self._call(
            "unet_full" if full else "unet", {"x_t": _f32(x_t), "y": _f32(y), "t": _col(t), "s": _col(s)}, "eps"
        )

    def flow_reverse(self, eps, y, tau_f) -> torch.Tensor:
        """x_Ttrunc ``(B,1,64,64)`` from a BLS request to the flow model."""
        return self._call("flow", {"eps": _f32(eps), "y": _f32(y), "tau_f": _col(tau_f)}, "x")

    def munet(self, y, s) -> torch.Tensor:
        """MUNet's x0 ``(B,1,64,64)`` from a BLS request to the MUNet model."""
        return self._call("munet", {"y": _f32(y), "s": _col(s)}, "x0")

    def enhancer_reverse(self, eps, y, x_munet, tau_f) -> torch.Tensor:
        """The enhanced x0 ``(B,1,64,64)`` from a BLS request to the flow enhancer model."""
        return self._call("flow_enhancer", {"eps": _f32(eps), "y": _f32(y), "x_munet": _f32(x_munet),
                                            "tau_f": _col(tau_f)}, "x")


def run_sampler(backend: Backend, y: np.ndarray, s: np.ndarray, settings: str) -> tuple[np.ndarray, int]:
    """One ftddm_sampler request: y (B,4,64,64), s (B,) or (B,1), settings JSON -> (x0 (B,1,64,64), nfe).

    A request carrying ``weights_sha256`` (the client's model folder) is refused (ModelMismatch) when a
    network's weights differ from the repository's (``BLSBackend.weights``).
    The generator is ``torch.Generator().manual_seed(seed)`` with the request's seed, exactly as
    ``sample_images`` seeds batch i with ``pipeline.batch_seed(seed, i)`` (the client sends that number)."""
    spec, seed, weights = decode_sampler_request(settings)
    if weights is not None:  # the client checked its model folder against these: the networks must be them
        check_same_model(weights, backend.describe().get("models", {}), weights, backend.origin(),
                         "folder the client checked")
    gen = torch.Generator().manual_seed(seed)
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    s_t = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32).reshape(-1))
    if y_t.ndim != 4 or y_t.shape[1] != 4 or s_t.shape[0] != y_t.shape[0]:
        raise ValueError(f"expected y (B,4,H,W) and s (B,), got {tuple(y_t.shape)} and {tuple(s_t.shape)}")
    res = sample_batch(backend, spec, y_t, s_t, gen)
    return _f32(res.x0), int(res.nfe)
