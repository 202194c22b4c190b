"""Weights on disk: ``NAME.safetensors`` + ``NAME.json``; never pickles.

``NAME.json`` = ``{"kind": "unet" | "flow" | "tdpm" | "tdpm_disc" | "fine_mask" | "munet" | "munet_critic" |
"flow_enhancer", "config": {...},
"n_params": int, "sha256": str}`` where ``sha256`` is the digest of ``NAME.safetensors``. ``path`` arguments may be
given with or without the ``.safetensors`` / ``.json`` suffix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

try:
    from safetensors.torch import load_file, save_file
except ImportError:  # a host without safetensors (e.g. the bare GPU check machine) can still read weights
    from ftddm_trt.models.safetensors_plain import load_file

    save_file = None
from torch import nn

from ftddm_trt.atomic import atomic_file, write_json_atomic
from ftddm_trt.models.config import FlowConfig, UNetConfig
from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
from ftddm_trt.models.flow import ConditionalFlow
from ftddm_trt.models.flow_enhancer import FlowEnhancer, FlowEnhancerConfig
from ftddm_trt.models.munet import MUNet, MUNetConfig, MUNetCritic
from ftddm_trt.models.tdpm import TDPMConfig, TDPMDiscriminator, TDPMGenerator
from ftddm_trt.models.unet import DenoisingUNet, count_parameters

#: A network config of any kind (each kind's config class).
AnyConfig = UNetConfig | FlowConfig | TDPMConfig | FineMaskConfig | MUNetConfig

_KINDS: dict[str, tuple[type[nn.Module], type[AnyConfig]]] = {
    "unet": (DenoisingUNet, UNetConfig),
    "flow": (ConditionalFlow, FlowConfig),
    "tdpm": (TDPMGenerator, TDPMConfig),
    "tdpm_disc": (TDPMDiscriminator, TDPMConfig),
    "fine_mask": (FineMaskNet, FineMaskConfig),
    "munet": (MUNet, MUNetConfig),
    "munet_critic": (MUNetCritic, MUNetConfig),
    "flow_enhancer": (FlowEnhancer, FlowEnhancerConfig),
}


def _base(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p


def weights_path(path: str | os.PathLike[str]) -> Path:
    """``NAME.safetensors`` for ``NAME`` (with or without suffix)."""
    return _base(path).with_suffix(".safetensors")


def meta_path(path: str | os.PathLike[str]) -> Path:
    """``NAME.json`` for ``NAME`` (with or without suffix)."""
    return _base(path).with_suffix(".json")


def model_kind(module: nn.Module) -> str:
    """The kind of ``module`` (a key of ``NAME.json``'s ``kind``: ``"unet"``, ``"flow"``, ``"munet"``, ...); the
    exact class decides first (``FlowEnhancer`` is a ``ConditionalFlow``), then a subclass of a kind's class."""
    for kind, (cls, _) in _KINDS.items():
        if type(module) is cls:
            return kind
    for kind, (cls, _) in _KINDS.items():
        if isinstance(module, cls):
            return kind
    raise TypeError(f"not a ftddm_trt model: {type(module).__name__}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of ``NAME.safetensors``."""
    return _sha256_file(weights_path(path))


def save_model(module: nn.Module, config: AnyConfig, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``path.safetensors`` and ``path.json``; returns the JSON metadata."""
    kind = model_kind(module)
    if type(config) is not _KINDS[kind][1]:
        raise TypeError(f"{kind} needs a {_KINDS[kind][1].__name__}, got {type(config).__name__}")
    own = getattr(module, "config", None)
    if own is not None and own != config:
        raise ValueError("config differs from the module's own config")
    wpath, mpath = weights_path(path), meta_path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    cfg = config.to_dict()
    if save_file is None:
        raise RuntimeError("writing weights needs the safetensors package (pip install safetensors)")
    with atomic_file(wpath) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": kind, "config": json.dumps(cfg, sort_keys=True)})
    meta = {"kind": kind, "config": cfg, "n_params": count_parameters(module), "sha256": _sha256_file(wpath)}
    write_json_atomic(mpath, meta, indent=2, sort_keys=True)
    return meta


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``NAME.json``."""
    meta = json.loads(meta_path(path).read_text())
    if meta.get("kind") not in _KINDS:
        raise ValueError(f"{meta_path(path)}: unknown kind {meta.get('kind')!r}")
    return meta


def load_config(path: str | os.PathLike[str]) -> AnyConfig:
    """The config stored in ``NAME.json``."""
    meta = load_meta(path)
    return _KINDS[meta["kind"]][1].from_dict(meta["config"])


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, verify: bool = True
) -> nn.Module:
    """Rebuild the network from ``NAME.json`` and fill it from ``NAME.safetensors`` (strict), in eval mode.

    ``verify`` checks the file's SHA-256 against the JSON. Flow inverse buffers are refreshed.
    """
    meta = load_meta(path)
    wpath = weights_path(path)
    if verify and meta.get("sha256") and _sha256_file(wpath) != meta["sha256"]:
        raise ValueError(f"{wpath}: sha256 does not match {meta_path(path)}")
    cls, cfg_cls = _KINDS[meta["kind"]]
    module = cls(cfg_cls.from_dict(meta["config"]))
    module.load_state_dict(load_file(str(wpath), device="cpu"), strict=True)
    module = module.to(map_location)
    module.eval()
    if isinstance(module, ConditionalFlow):
        module.refresh_inverse()
    return module


__all__ = [
    "save_model",
    "load_model",
    "load_meta",
    "load_config",
    "model_sha256",
    "model_kind",
    "weights_path",
    "meta_path",
]
