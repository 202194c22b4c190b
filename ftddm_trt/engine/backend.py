"""The one small interface every runtime implements.

A backend runs the networks of one exported model set; it never knows about samplers. Tensors cross
the interface as float32 torch tensors on ``backend.device`` (CPU for ONNX Runtime and Triton):

- ``unet(x_t (B,1,64,64), y (B,4,64,64), t (B,), s (B,), full=False) -> eps (B,1,64,64)``;
  ``full=True`` selects the UNet trained on the whole chain (DDPM baselines);
- ``flow_reverse(eps (B,1,64,64), y (B,4,64,64), tau_f (B,)) -> x_Ttrunc (B,1,64,64)``;
- ``munet(y (B,4,64,64), s (B,)) -> x0 (B,1,64,64)``: the MUNet-FS-cWGAN baseline (zero outside M);
- ``enhancer_reverse(eps (B,1,64,64), y (B,4,64,64), x_munet (B,1,64,64), tau_f (B,)) -> x0 (B,1,64,64)``:
  the Flow Enhancer baseline's flow, sharpening MUNet's estimate ``x_munet``.

The two baseline methods are not abstract: a backend without them (or a model without the networks)
refuses them by name (``MissingNetwork``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

#: Network names, shared by model files, ONNX files, engines and Triton models.
NETWORKS: tuple[str, ...] = ("unet", "unet_full", "flow", "munet", "flow_enhancer")


class MissingNetwork(KeyError):
    """A sampler needs a network the backend's model / export / engines / server does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Backend(ABC):
    """Runs the FTDDM networks; subclasses differ in how, never in the math."""

    name: str = "abstract"
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def unet(
        self, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor, s: torch.Tensor, full: bool = False
    ) -> torch.Tensor:
        """Predicted noise for a batch."""

    @abstractmethod
    def flow_reverse(self, eps: torch.Tensor, y: torch.Tensor, tau_f: torch.Tensor) -> torch.Tensor:
        """x_Ttrunc drawn by the flow from unit-normal ``eps`` at temperature ``tau_f``."""

    def munet(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x0 estimate ``(B,1,64,64)`` of the MUNet-FS-cWGAN baseline (one evaluation)."""
        raise MissingNetwork(f"{self.origin()} does not run the munet network")

    def enhancer_reverse(self, eps: torch.Tensor, y: torch.Tensor, x_munet: torch.Tensor,
                         tau_f: torch.Tensor) -> torch.Tensor:
        """The Flow Enhancer's sharpened x0 ``(B,1,64,64)`` from unit-normal ``eps`` at temperature ``tau_f``."""
        raise MissingNetwork(f"{self.origin()} does not run the flow_enhancer network")

    @property
    def flow_ttrunc(self) -> int | None:
        """The Ttrunc this backend's flow was trained for, as its model / export / engines / server record
        it; None when unrecorded (then any Ttrunc is accepted). Raises TtruncMismatch for a manifest
        written before Ttrunc was recorded."""
        return None

    def origin(self) -> str:
        """Where the networks come from, for messages (a folder, a server)."""
        return f"the {self.name} backend"

    def expect_weights(self, hashes: dict[str, str]) -> None:
        """The weights (network -> sha256) the caller checked this backend's networks against
        (``engine.model_check``); a backend that samples elsewhere (Triton's server loop) passes them on."""

    def describe(self) -> dict[str, Any]:
        """Facts for run.json: backend name, device, precision, model/engine hashes; ``models``: network ->
        sha256 of the weights each network was made from."""
        return {"backend": self.name, "device": str(self.device)}

    def close(self) -> None:
        """Release sessions, connections, GPU memory."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
