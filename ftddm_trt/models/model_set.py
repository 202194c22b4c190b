"""A trained FTDDM model set on disk: the networks one deployment needs, side by side.

Layout of a model folder (weights as safetensors + JSON config, written by ``models.io``)::

    unet.safetensors / unet.json            denoising UNet, trained on t in 1..Ttrunc
    unet_full.safetensors / unet_full.json  the same UNet trained on 1..T (DDPM baselines)
    flow.safetensors / flow.json            conditional flow that draws x_Ttrunc
    manifest.json                           training commands, data seed, sha256 of each file

The shipped model lives in ``ftddm_trt/assets/model`` so that an installed package finds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ftddm_trt.models.io import load_model, model_sha256

NETWORK_FILES: tuple[str, ...] = ("unet", "unet_full", "flow")
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"


@dataclass(frozen=True)
class ModelSet:
    """The networks found in ``root``; at least one of them must exist."""

    root: Path

    @classmethod
    def open(cls, root: Path | str | None = None) -> "ModelSet":
        """Open a model folder (default: the shipped model), checking that it holds networks."""
        path = Path(root) if root is not None else SHIPPED_MODEL_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")
        found = [n for n in NETWORK_FILES if (path / f"{n}.safetensors").is_file()]
        if not found:
            raise FileNotFoundError(f"model folder {path} holds none of {', '.join(n + '.safetensors' for n in NETWORK_FILES)}")
        return cls(path)

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(n for n in NETWORK_FILES if (self.root / f"{n}.safetensors").is_file())

    def config(self, name: str) -> dict:
        return json.loads((self.root / f"{name}.json").read_text())

    def load_torch(self, map_location: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
        return {n: load_model(self.root / n, map_location=map_location) for n in self.networks}

    def hashes(self) -> dict[str, str]:
        """sha256 of each network's safetensors file."""
        return {n: model_sha256(self.root / n) for n in self.networks}

    def flow_ttrunc(self) -> int | None:
        """The truncation point the flow was trained for (from the manifest), or None if unrecorded."""
        cfg = self.manifest().get("networks", {}).get("flow", {}).get("train_config") or {}
        return int(cfg["t_trunc"]) if "t_trunc" in cfg else None

    def manifest(self) -> dict:
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}
