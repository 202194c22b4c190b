"""Score a prediction folder against a truth folder: the application logic behind `ftddm-trt evaluate`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ftddm_trt.atomic import OutputError, write_text_atomic
from ftddm_trt.constants import HR_SIZE
from ftddm_trt.workflows.console import console


class EvaluateError(Exception):
    """The folders cannot be compared (unreadable, another grid); the message names why."""


def evaluate_folders(pred_dir: Path, truth_dir: Path, input_dir: Path | None = None) -> dict:
    """Metrics of a prediction folder against a truth folder (and of the zero-filled input when known)."""
    from ftddm_trt.data.kspace import zero_fill
    from ftddm_trt.data.nifti.files import InputError
    from ftddm_trt.data.nifti.read import read_map_folder, read_subject
    from ftddm_trt.evaluation.volumes import evaluate_volume

    try:
        pred, pred_aff, metabs = read_map_folder(pred_dir)
        truth, truth_aff, _ = read_map_folder(truth_dir, metabolites=metabs)
        masks_dir = truth_dir / "masks"
        if masks_dir.is_dir():
            mask, _, _ = read_map_folder(masks_dir, metabolites=metabs, subfolder=None)
            mask = mask > 0.5
        else:
            mask = truth > 0
    except InputError as err:
        raise EvaluateError(str(err)) from err
    if pred.shape != truth.shape:
        raise EvaluateError(f"{pred_dir}: maps of shape {pred.shape} do not match the truth {truth_dir} {truth.shape}")
    if not np.allclose(pred_aff, truth_aff, atol=1e-3):
        raise EvaluateError(f"{pred_dir}: affine differs from the truth's ({truth_dir}); not the same grid")
    baselines = {}
    if input_dir is None and (pred_dir / "run.json").is_file():
        input_dir = Path(json.loads((pred_dir / "run.json").read_text())["input"])
    if input_dir is not None and input_dir.is_dir():
        try:
            subject = read_subject(input_dir)
            idx = [subject.metabolites.index(m) for m in metabs]
            baselines["zero-filled"] = zero_fill(subject.lr[:, idx], HR_SIZE)
        except (InputError, ValueError) as err:
            console.print(f"[yellow]no zero-filled baseline:[/] {err}")
    return evaluate_volume(pred, truth, mask, metabs, baselines)


def check_json_target(path: Path, force: bool, inputs: tuple[Path | None, ...]) -> None:
    """Refuse (OutputError), before anything is computed, a metrics file inside an input folder, an
    existing file without ``force``, a folder, or one in a folder that cannot be written."""
    target = path.resolve()
    for src in inputs:
        if src is not None and (target == src.resolve() or src.resolve() in target.parents):
            raise OutputError(f"{path} lies inside the input folder {src}; write the metrics elsewhere")
    if target.is_dir():
        raise OutputError(f"{path} is a folder")
    if target.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to replace it")
    if not os.access(target.parent if target.parent.exists() else Path.cwd(), os.W_OK):
        raise OutputError(f"cannot write into {target.parent}: read-only or no permission")


def write_metrics(path: Path, result: dict, force: bool, inputs: tuple[Path | None, ...]) -> None:
    """Write ``result`` as strict JSON (non-finite values null) to ``path`` atomically, after
    ``check_json_target``."""
    from ftddm_trt.integrity import strict_json

    check_json_target(path, force, inputs)
    write_text_atomic(path.resolve(), strict_json(result, indent=2))
