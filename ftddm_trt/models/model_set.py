"""A trained FTDDM model set on disk: the networks one deployment needs, side by side.

Layout of a model folder (weights as safetensors + JSON config, written by ``models.io``)::

    unet.safetensors / unet.json            denoising UNet, trained on t in 1..Ttrunc
    unet_full.safetensors / unet_full.json  the same UNet trained on 1..T (DDPM baselines)
    flow.safetensors / flow.json            conditional flow that draws x_Ttrunc (Ttrunc in the manifest)
    flow_t<T>.safetensors / flow_t<T>.json  optional flows for other truncation points T
    tdpm.safetensors / tdpm.json            optional TDPM generator (baseline): draws x_Ttrunc adversarially
    munet.safetensors / munet.json          optional MUNet-FS-cWGAN (baseline, ``models.munet``): x0 in one pass
    flow_enhancer.safetensors / .json       optional Flow Enhancer (baseline, ``models.flow_enhancer``): sharpens
                                            the folder's munet
    fine_mask.safetensors / fine_mask.json  optional fine-mask estimator (``models.fine_mask``): input
                                            preparation for the ``lr`` qc step, run in PyTorch on the
                                            client whatever the backend, so never exported
    manifest.json                           training commands, data seed, sha256 of each file
    distilled/                              optional distilled model (``ftddm-trt distill``): a model folder
                                            whose ``unet`` is a student of this folder's default sampler,
                                            beside copies of the flow and the fine-mask estimator

A ``ModelSet`` opened for a truncation point presents the matching flow as its ``flow`` network (opened
with ``start="tdpm"``, the TDPM generator, which has the flow's reverse interface), so
exports, engines, Triton repositories and backends built from it never need to know which it is.

The shipped model lives in ``ftddm_trt/assets/model`` so that an installed package finds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ftddm_trt.models.io import load_model, model_sha256

if TYPE_CHECKING:
    from ftddm_trt.models.fine_mask import FineMaskNet

NETWORK_FILES: tuple[str, ...] = ("unet", "unet_full", "flow", "munet", "flow_enhancer")
#: How each baseline network is made, for the message naming a missing one.
_MAKE = {
    "munet": "`ftddm-trt train --task munet` and `ftddm-trt package-model --munet RUN`",
    "flow_enhancer": "`ftddm-trt train --task flow_enhancer --munet MUNET_RUN` and "
                     "`ftddm-trt package-model --munet MUNET_RUN --flow-enhancer RUN`",
}
#: What may draw the start point x_Ttrunc of the truncated chain.
START_NETWORKS: tuple[str, ...] = ("flow", "tdpm")
#: File stem of the optional fine-mask estimator (not one of NETWORK_FILES: no backend runs it).
FINE_MASK_FILE = "fine_mask"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"
#: Subfolder of a model folder that holds its distilled model.
DISTILLED_DIR = "distilled"
#: Manifest key of a distilled model folder: the teacher, the student's steps, how it was trained.
DISTILLED_KEY = "distilled"


def is_distilled(root: Path | str) -> bool:
    """True when the model folder ``root`` is a distilled model (its manifest has a ``distilled`` record)."""
    path = Path(root) / "manifest.json"
    try:
        return DISTILLED_KEY in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def distilled_folder(root: Path | str | None) -> Path:
    """The model folder the ``ftddm-distilled`` sampler runs for model ``root`` (default: the shipped model):
    ``root`` itself when it is a distilled model, else ``root/distilled``. FileNotFoundError naming
    ``ftddm-trt distill`` when there is none."""
    path = Path(root) if root is not None else SHIPPED_MODEL_DIR
    for candidate in (path, path / DISTILLED_DIR):
        if is_distilled(candidate):
            return candidate
    raise FileNotFoundError(f"the model {path} has no distilled model ({path / DISTILLED_DIR}); make one with "
                            f"`ftddm-trt distill --model {path} --out {path / DISTILLED_DIR}`")


def distilled_steps(folder: Path | str) -> int:
    """The UNet evaluations the distilled model in ``folder`` (from ``distilled_folder``) was trained to take."""
    record = json.loads((Path(folder) / "manifest.json").read_text())[DISTILLED_KEY]
    return int(record["steps"])


def distilled_teacher_mismatch(root: Path | str | None) -> str | None:
    """Why the distilled model of ``root`` (``root/distilled``) is not a student of ``root``'s own networks
    (its recorded teacher UNet, or its copied flow, differ from the folder's), or None when it is one;
    None also when ``root`` is itself a distilled model. FileNotFoundError when there is no distilled model."""
    folder = distilled_folder(root)
    path = Path(root) if root is not None else SHIPPED_MODEL_DIR
    if folder.resolve() == path.resolve():
        return None
    model, student = ModelSet.open(path).hashes(), ModelSet.open(folder).hashes()
    teacher = json.loads((folder / "manifest.json").read_text())[DISTILLED_KEY].get("teacher_sha256", {})
    if teacher.get("unet") != model.get("unet"):
        return f"{folder} was distilled from another UNet than {path / 'unet.safetensors'}"
    if student.get("flow") != model.get("flow"):
        return f"{folder} carries another flow than {path / 'flow.safetensors'}"
    return None


@dataclass(frozen=True)
class ModelSet:
    """The networks found in ``root``; ``flow_file`` is the file stem serving as ``flow``."""

    root: Path
    flow_file: str = "flow"

    @classmethod
    def open(cls, root: Path | str | None = None, ttrunc: int | None = None, start: str = "flow") -> "ModelSet":
        """Open a model folder (default: the shipped model), checking that it holds networks.

        ``ttrunc`` selects the flow trained for that truncation point: ``flow`` when the manifest says
        it was trained there (or does not say), else ``flow_t<ttrunc>``; a clear error if neither fits.
        ``start="tdpm"`` presents the TDPM generator (``tdpm.*``) as the start-point network instead.
        """
        path = Path(root) if root is not None else SHIPPED_MODEL_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {path} does not exist")
        found = [n for n in NETWORK_FILES if (path / f"{n}.safetensors").is_file()]
        if not found:
            raise FileNotFoundError(
                f"model folder {path} holds none of {', '.join(n + '.safetensors' for n in NETWORK_FILES)}"
            )
        if start not in START_NETWORKS:
            raise ValueError(f"start must be one of {', '.join(START_NETWORKS)}, got {start!r}")
        if start == "tdpm":
            if not (path / "tdpm.safetensors").is_file():
                raise FileNotFoundError(
                    f"{path} has no TDPM generator (tdpm.safetensors); train one with "
                    "`ftddm-trt train --task tdpm` and add it with `ftddm-trt package-model --tdpm`"
                )
            models = cls(path, flow_file="tdpm")
            trained = models.flow_ttrunc()
            if ttrunc is not None and trained is not None and trained != ttrunc:
                raise FileNotFoundError(
                    f"{path}: the TDPM generator draws x_Ttrunc at Ttrunc = {trained}, not {ttrunc}"
                )
            return models
        models = cls(path)
        main = models.flow_ttrunc()
        if ttrunc is None or main is None or ttrunc == main:
            return models
        if (path / f"flow_t{ttrunc}.safetensors").is_file():
            return cls(path, flow_file=f"flow_t{ttrunc}")
        have = ", ".join(str(t) for t in models.flow_ttruncs())
        raise FileNotFoundError(f"{path} has no flow for Ttrunc = {ttrunc}: its flows are trained at Ttrunc = {have} "
                                f"(train one with `ftddm-trt train --task flow --ttrunc {ttrunc}` and add it with "
                                "`ftddm-trt package-model --extra-flow`)")

    def _stem(self, name: str) -> str:
        return self.flow_file if name == "flow" else name

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks whose weights the folder holds (``flow`` as ``flow_file``)."""
        return tuple(n for n in NETWORK_FILES if (self.root / f"{self._stem(n)}.safetensors").is_file())

    def require(self, networks: tuple[str, ...] | list[str], sampler: str) -> None:
        """FileNotFoundError naming each missing ``NAME.safetensors`` of ``networks`` (those ``sampler`` runs)
        and how to make it."""
        missing = [n for n in networks if n not in self.networks]
        if missing:
            how = "; ".join(f"{n}: {_MAKE[n]}" for n in missing if n in _MAKE)
            raise FileNotFoundError(
                f"the {sampler} sampler needs {', '.join(self._stem(n) + '.safetensors' for n in missing)} in the "
                f"model folder {self.root}, which has none" + (f" (make it with {how})" if how else "")
            )

    def config(self, name: str) -> dict:
        """The parsed ``NAME.json`` of network ``name``."""
        return json.loads((self.root / f"{self._stem(name)}.json").read_text())

    def load_torch(self, map_location: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
        """Every network of the folder as a torch module (weights verified against their sha256 on load)."""
        return {n: load_model(self.root / self._stem(n), map_location=map_location) for n in self.networks}

    def hashes(self) -> dict[str, str]:
        """sha256 of each network's safetensors file."""
        return {n: model_sha256(self.root / self._stem(n)) for n in self.networks}

    def fine_mask_net(self) -> "FineMaskNet | None":
        """The fine-mask estimator, its weights verified against the JSON sidecar and the manifest's sha256
        (IntegrityError on a mismatch); None when the folder has none."""
        from ftddm_trt.integrity import IntegrityError, verify_file

        path = self.root / FINE_MASK_FILE
        if not path.with_suffix(".safetensors").is_file():
            return None
        recorded = self.manifest().get("networks", {}).get(FINE_MASK_FILE, {}).get("sha256")
        if recorded:
            verify_file(path.with_suffix(".safetensors"), recorded, what="fine-mask estimator")
        try:
            return load_model(path)
        except ValueError as err:  # the JSON sidecar's sha256 differs
            raise IntegrityError(f"IntegrityError: {err}") from err

    def fine_mask_sha256(self) -> str | None:
        """sha256 of ``fine_mask.safetensors``, or None when the folder has no estimator."""
        path = self.root / FINE_MASK_FILE
        return model_sha256(path) if path.with_suffix(".safetensors").is_file() else None

    def flow_ttrunc(self) -> int | None:
        """The truncation point this set's flow was trained for (manifest), or None if unrecorded."""
        cfg = self.manifest().get("networks", {}).get(self.flow_file, {}).get("train_config") or {}
        return int(cfg["t_trunc"]) if "t_trunc" in cfg else None

    def flow_ttruncs(self) -> list[int]:
        """Every truncation point a flow in this folder was trained for."""
        nets = self.manifest().get("networks", {})
        return sorted({int(v["train_config"]["t_trunc"]) for k, v in nets.items()
                       if (k == "flow" or k.startswith("flow_t")) and (v.get("train_config") or {}).get("t_trunc")})

    def manifest(self) -> dict:
        """The folder's ``manifest.json``, or ``{}`` when it has none."""
        path = self.root / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}
