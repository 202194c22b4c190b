"""Resumable training checkpoints without pickles.

A checkpoint is a folder holding the model (``model.safetensors`` + ``model.json`` via
``models.io``), the Adam state (``optim.safetensors``) and ``state.json`` (step, best validation
loss, RNG states, training config), and ``ema.safetensors`` when the run keeps a moving average of the
weights. It is written to a temporary folder and swapped in with renames,
so an interruption at any moment leaves either the old or the new checkpoint whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ftddm_trt.models.io import load_model, save_model

#: File of a checkpoint holding the exponential moving average of the weights (``TrainConfig.ema``).
EMA_FILE = "ema.safetensors"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            name = f"{idx}.{key}"
            if torch.is_tensor(val):
                tensors[name] = val.detach().cpu().contiguous()
            else:
                scalars[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    model_config: Any,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``folder`` atomically (tmp folder, then rename over the old one); ``ema_state`` (the weight
    average's state dict, if any) goes to ``EMA_FILE`` inside it."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, model_config, tmp / "model")
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optim.safetensors"))
    (tmp / "optim.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if ema_state is not None:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
    if folder.exists():  # `folder` is whole: the stale `.old` may go, then `folder` becomes `.old`
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    # else `.old` (left by an interrupted swap) is the only whole checkpoint: keep it until `tmp` is in place
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_ema_state(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The weight average saved in checkpoint ``folder`` (None when it holds none)."""
    path = Path(folder) / EMA_FILE
    return load_file(str(path), device=str(map_location)) if path.is_file() else None


def find_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: ``folder`` itself, else the ``.old`` left by an interrupted swap."""
    folder = Path(folder)
    for cand in (folder, folder.with_name(folder.name + ".old")):
        if (cand / "state.json").is_file() and (cand / "optim.json").is_file():
            return cand
    return None


def load_checkpoint(
    folder: Path, opt_factory, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Load model, optimizer (built by ``opt_factory(model)``) and state from a checkpoint folder."""
    folder = Path(folder)
    model = load_model(folder / "model", map_location=map_location)
    opt = opt_factory(model)
    tensors = load_file(str(folder / "optim.safetensors"), device=str(map_location))
    meta = json.loads((folder / "optim.json").read_text())
    _restore_optimizer(opt, tensors, meta)
    state = json.loads((folder / "state.json").read_text())
    return model, opt, state
