"""A site's own high-resolution subjects as training data (``ftddm-trt finetune`` / ``train --data``).

Layout (FSL-MRS ``fsl_mrsi`` output of a 64 x 64 acquisition), one folder per subject ``ROOT/sub-*``::

    concs/<raw|internal|molarity|molality>/<metab>.nii.gz   64 x 64 x Z maps (one grid for all files)
    masks/<metab>.nii.gz                                    64 x 64 x Z quality masks, or
    qc/<metab>_snr.nii.gz, qc/<metab>_fwhm.nii.gz          64 x 64 x Z qc maps (mask: SNR >= 2.5, FWHM <= 0.15)
    t1.nii.gz, flair.nii.gz                                 any grid, resampled onto the maps' grid

Training pairs are then made from these maps the way an acquisition makes them (``data.examples``):
k-space truncation to N x N and the ``lr`` mask M from the acquired map (``masks.lr_support_mask``); the
fine-mask estimator's pairs write N x N qc maps from the 64 x 64 qc in every convention
(``data.qc_conventions``). When a subject gives masks but no qc, its qc is synthesized from the mask
(SNR = twice the threshold inside, 0 outside; FWHM 0.05 ppm).

Every problem is an ``InputError`` naming the file, raised before any training starts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ftddm_trt.constants import FWHM_MAX_PPM, HR_SIZE, SNR_MIN
from ftddm_trt.data.masks import quality_mask_from_qc
from ftddm_trt.data.nifti.files import InputError, find_file, load_volume, match_metabolites, nifti_files, same_grid
from ftddm_trt.data.nifti.read import read_map_folder
from ftddm_trt.data.nifti.resample import linear_onto

__all__ = ["TrainingSubject", "read_training_subject", "read_training_folder", "split_subjects", "folder_sha256",
           "MIN_SUBJECTS"]

#: Fewest subjects a training folder may hold (at least one to train on and one to validate on).
MIN_SUBJECTS = 2


@dataclass(frozen=True)
class TrainingSubject:
    """One high-resolution subject, shaped like ``data.phantom.PhantomSubject`` for ``SlicePool``.

    maps, masks, snr, fwhm: ``(Z, C, 64, 64)`` (maps zero outside masks, file units; FWHM in ppm);
    t1, flair: ``(Z, 64, 64)`` on the maps' grid; metabolites: the ``C`` names; qc_source: ``qc`` or ``masks``.
    """

    subject_id: str
    maps: NDArray[np.float32]
    masks: NDArray[np.bool_]
    snr: NDArray[np.float32]
    fwhm: NDArray[np.float32]
    t1: NDArray[np.float32]
    flair: NDArray[np.float32]
    metabolites: tuple[str, ...]
    qc_source: str


def _stack_folder(folder: Path, names: tuple[str, ...], suffix: str, ref_path: Path, ref_shape: tuple,
                  ref_aff: NDArray, what: str) -> NDArray[np.float32] | None:
    """``(Z, C, 64, 64)`` of ``folder/<metab><suffix>`` on the maps' grid, or None if any is missing."""
    files, _ = match_metabolites(nifti_files(folder), suffix)
    if not all(m in files for m in names):
        return None
    vols = []
    for m in names:
        data, aff = load_volume(files[m], what)
        same_grid(files[m], ref_path, data, aff, ref_shape, ref_aff)
        vols.append(data.transpose(2, 0, 1))
    return np.stack(vols, axis=1).astype(np.float32)


def read_training_subject(path: str | os.PathLike[str]) -> TrainingSubject:
    """Read and check one subject folder (layout in the module docstring)."""
    root = Path(path)
    maps, aff, names = read_map_folder(root)  # one grid for every map, or a named InputError
    concs = next(root / "concs" / k for k in ("raw", "internal", "molarity", "molality")
                 if match_metabolites(nifti_files(root / "concs" / k))[0])
    ref_path = match_metabolites(nifti_files(concs))[0][names[0]]
    z, _, nx, ny = maps.shape
    if (nx, ny) != (HR_SIZE, HR_SIZE):
        raise InputError(ref_path, f"in-plane size {nx} x {ny}: training data must be acquired at "
                                   f"{HR_SIZE} x {HR_SIZE} (the super-resolution grid)")
    if not np.any(maps):
        raise InputError(concs, "every map is zero")
    ref_shape = (nx, ny, z)

    masks = _stack_folder(root / "masks", names, "", ref_path, ref_shape, aff, "mask")
    snr = _stack_folder(root / "qc", names, "_snr", ref_path, ref_shape, aff, "qc map")
    fwhm = _stack_folder(root / "qc", names, "_fwhm", ref_path, ref_shape, aff, "qc map")
    if snr is not None and fwhm is not None:
        quality = quality_mask_from_qc(snr, fwhm)
        masks_b = quality if masks is None else (masks > 0.5) & quality
        qc_source = "qc"
    elif masks is not None:
        masks_b = masks > 0.5
        snr = np.where(masks_b, 2.0 * SNR_MIN, 0.0).astype(np.float32)
        fwhm = np.full(masks_b.shape, 0.05, np.float32)
        qc_source = "masks"
    else:
        raise InputError(
            root,
            f"no quality information: give masks/<metab>.nii.gz or qc/<metab>_snr.nii.gz and "
            f"qc/<metab>_fwhm.nii.gz for every metabolite ({', '.join(names)}), at {HR_SIZE} x {HR_SIZE}",
        )
    for c, m in enumerate(names):
        if not masks_b[:, c].any():
            where = root / ("qc" if qc_source == "qc" else "masks")
            raise InputError(where, f"the quality mask of {m} is empty (no voxel with SNR >= {SNR_MIN} and "
                                    f"FWHM <= {FWHM_MAX_PPM} ppm)" if qc_source == "qc" else f"masks/{m} is empty")

    anatomy = {}
    for name in ("t1", "flair"):
        p = find_file(root, name)
        if p is None:
            raise InputError(root / f"{name}.nii.gz", "missing: training needs both T1 and FLAIR for every subject")
        data, a = load_volume(p, "image")
        vol = linear_onto(p, data, a, aff, ref_shape).transpose(2, 0, 1)
        if not np.any(vol > 0):
            raise InputError(p, "image is zero (or negative) everywhere on the maps' grid")
        anatomy[name] = np.ascontiguousarray(vol, dtype=np.float32)

    return TrainingSubject(subject_id=root.name, maps=np.where(masks_b, maps, 0.0).astype(np.float32),
                           masks=masks_b, snr=snr, fwhm=fwhm.astype(np.float32), t1=anatomy["t1"],
                           flair=anatomy["flair"], metabolites=names, qc_source=qc_source)


def subject_folders(root: str | os.PathLike[str]) -> list[Path]:
    """The ``sub-*`` folders of ``root``, sorted; an ``InputError`` if ``root`` is not a folder."""
    base = Path(root)
    if not base.is_dir():
        raise InputError(base, "training folder does not exist")
    return sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("sub-"))


def read_training_folder(root: str | os.PathLike[str], min_subjects: int = MIN_SUBJECTS) -> list[TrainingSubject]:
    """Every ``sub-*`` subject of ``root``, checked (an ``InputError`` names the first problem)."""
    folders = subject_folders(root)
    if len(folders) < min_subjects:
        raise InputError(
            Path(root), f"{len(folders)} subject folder(s) (sub-*): training needs at least {min_subjects}"
        )
    subjects = [read_training_subject(p) for p in folders]
    first = subjects[0]
    for subj in subjects[1:]:
        if subj.metabolites != first.metabolites:
            raise InputError(Path(root) / subj.subject_id, f"metabolites {', '.join(subj.metabolites)} differ from "
                                                            f"{first.subject_id}'s {', '.join(first.metabolites)}")
    return subjects


def split_subjects(subjects: list, n_val: int) -> tuple[list, list]:
    """(train, validation): the last ``n_val`` subjects (in id order) validate, the others train."""
    if not 1 <= n_val < len(subjects):
        raise ValueError(f"cannot hold out {n_val} of {len(subjects)} subjects for validation "
                         f"(need at least 1 for validation and 1 for training)")
    return subjects[:-n_val], subjects[-n_val:]


def folder_sha256(root: str | os.PathLike[str]) -> str:
    """sha256 over the relative path and bytes of every file of every ``sub-*`` folder (sorted)."""
    h = hashlib.sha256()
    base = Path(root)
    for sub in subject_folders(base):
        for p in sorted(q for q in sub.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(base)).encode() + b"\0")
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
