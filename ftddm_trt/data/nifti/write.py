"""Writing subjects and outputs in the FSL-MRS layout (``data.nifti``); every file written whole.

Arrays in memory are ``(Z, ...)``, on disk ``(X, Y, Z)``: ``_vol_to_disk`` does the transpose. Each NIfTI
and ``phantom.json`` goes through ``atomic.atomic_file``, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import nibabel as nib
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ftddm_trt.atomic import atomic_file, write_json_atomic
from ftddm_trt.constants import HR_SIZE, LR_SIZES, METABOLITES
from ftddm_trt.data.kspace import kspace_truncate
from ftddm_trt.data.masks import lr_qc_maps
from ftddm_trt.data.nifti.resample import lr_affine_for
from ftddm_trt.data.qc_conventions import QcConvention, acquired_qc

if TYPE_CHECKING:
    from ftddm_trt.data.phantom import PhantomSubject

__all__ = ["write_subject", "write_maps", "write_training_subject", "write_phantom_subject"]


def _save(path: Path, data_xyz: NDArray, affine: ArrayLike, like: nib.Nifti1Header | None = None) -> None:
    """Write a NIfTI atomically (``atomic.atomic_file``: a temporary file in the same folder, then ``os.replace``).

    ``like``: an input's header whose sform/qform codes, units and intent the file keeps (viewers
    overlay images by those codes); without it, both codes are 1 (scanner) and units mm."""
    img = nib.Nifti1Image(data_xyz, np.asarray(affine, dtype=np.float64))
    if like is None:
        img.header.set_xyzt_units("mm")
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    else:
        img.set_qform(img.affine, code=int(like["qform_code"]))
        img.set_sform(img.affine, code=int(like["sform_code"]))
        img.header.set_xyzt_units(*like.get_xyzt_units())
        name, params, intent_name = like.get_intent()
        img.header.set_intent(name, params, intent_name)
    with atomic_file(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def _vol_to_disk(vol: ArrayLike, dtype: type = np.float32) -> NDArray:
    """``(Z, X, Y)`` in memory -> ``(X, Y, Z)`` on disk."""
    a = np.asarray(vol)
    if a.ndim != 3:
        raise ValueError(f"expected a (Z, X, Y) volume, got shape {a.shape}")
    return np.ascontiguousarray(a.transpose(1, 2, 0)).astype(dtype)


def _per_metab(name: str, arr: ArrayLike, metabolites: Sequence[str]) -> NDArray:
    a = np.asarray(arr)
    if a.ndim != 4 or a.shape[1] != len(metabolites):
        raise ValueError(f"{name} must be (Z, {len(metabolites)}, X, Y), got shape {a.shape}")
    return a


def write_subject(
    out_dir: str | os.PathLike[str],
    lr: ArrayLike,
    affine_lr: ArrayLike,
    *,
    metabolites: Sequence[str] = METABOLITES,
    kind: str = "raw",
    snr: ArrayLike | None = None,
    fwhm: ArrayLike | None = None,
    t1: ArrayLike | None = None,
    t1_affine: ArrayLike | None = None,
    flair: ArrayLike | None = None,
    flair_affine: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    masks_affine: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    mask_affine: ArrayLike | None = None,
) -> Path:
    """Write one subject as FSL-MRS output (what a user hands to ``read_subject``).

    Args:
        out_dir: subject folder (created).
        lr: ``(Z, M, n, n)`` acquired maps; ``affine_lr`` their ``(4, 4)`` affine.
        metabolites: the ``M`` names, file stems.
        kind: concentration folder name.
        snr, fwhm: optional ``(Z, M, n, n)`` qc maps (FWHM in ppm), written to ``qc/``.
        t1, flair: optional ``(Z', X', Y')`` anatomy with their own affines (default ``affine_lr``).
        masks: optional ``(Z', M, X', Y')`` per-metabolite masks -> ``masks/<metab>.nii.gz``.
        mask: optional ``(Z', X', Y')`` shared mask -> ``mask.nii.gz``.
        masks_affine, mask_affine: their affines (default ``affine_lr``).

    Returns:
        the subject folder.
    """
    out = Path(out_dir)
    lr = _per_metab("lr", lr, metabolites)
    for c, name in enumerate(metabolites):
        _save(out / "concs" / kind / f"{name}.nii.gz", _vol_to_disk(lr[:, c]), affine_lr)
    for suffix, qc in (("snr", snr), ("fwhm", fwhm)):
        if qc is not None:
            qc = _per_metab(suffix, qc, metabolites)
            for c, name in enumerate(metabolites):
                _save(out / "qc" / f"{name}_{suffix}.nii.gz", _vol_to_disk(qc[:, c]), affine_lr)
    for fname, vol, aff in (("t1", t1, t1_affine), ("flair", flair, flair_affine)):
        if vol is not None:
            _save(out / f"{fname}.nii.gz", _vol_to_disk(vol), affine_lr if aff is None else aff)
    if masks is not None:
        masks = _per_metab("masks", masks, metabolites)
        for c, name in enumerate(metabolites):
            _save(out / "masks" / f"{name}.nii.gz", _vol_to_disk(masks[:, c], np.uint8),
                  affine_lr if masks_affine is None else masks_affine)
    if mask is not None:
        _save(out / "mask.nii.gz", _vol_to_disk(mask, np.uint8), affine_lr if mask_affine is None else mask_affine)
    return out


def write_maps(
    out_dir: str | os.PathLike[str],
    maps: ArrayLike,
    affine: ArrayLike,
    kind: str = "raw",
    sd: ArrayLike | None = None,
    metabolites: Sequence[str] = METABOLITES,
    like: nib.Nifti1Header | None = None,
) -> Path:
    """Write ``(Z, M, X, Y)`` maps (e.g. super-resolved 64x64) as ``concs/<kind>/<metab>.nii.gz``.

    ``sd`` (same shape, per-voxel standard deviation of repeated samples) goes to
    ``uncertainties/<metab>_sd.nii.gz`` (``<kind>_<metab>_sd`` for a kind other than raw, so that the
    kinds of one subject do not overwrite each other). ``like``: the input header whose sform/qform
    codes, units and intent every file keeps (``SubjectInput.header``). Returns ``out_dir``.
    """
    out = Path(out_dir)
    maps = _per_metab("maps", maps, metabolites)
    for c, name in enumerate(metabolites):
        _save(out / "concs" / kind / f"{name}.nii.gz", _vol_to_disk(maps[:, c]), affine, like)
    if sd is not None:
        sd = _per_metab("sd", sd, metabolites)
        prefix = "" if kind == "raw" else f"{kind}_"
        for c, name in enumerate(metabolites):
            _save(out / "uncertainties" / f"{prefix}{name}_sd.nii.gz", _vol_to_disk(sd[:, c]), affine, like)
    return out


def write_training_subject(out_dir: str | os.PathLike[str], subject: "PhantomSubject") -> Path:
    """Write a phantom as a site's high-resolution training subject (``data.training_folder`` layout).

    ``concs/raw`` = the 64x64 quality-filtered maps, ``qc/`` = their 64x64 SNR and FWHM, ``masks/`` = the
    quality masks (which also exclude the lipid rim, not visible in qc), ``t1``/``flair`` on the 128x128
    anatomy grid; all under ``out_dir/<subject_id>/``. Returns the subject folder.
    """
    sub_dir = Path(out_dir) / subject.subject_id
    write_subject(
        sub_dir,
        subject.maps,
        subject.mrsi_affine_hr,
        snr=subject.snr,
        fwhm=subject.fwhm,
        masks=subject.masks,
        t1=subject.t1_hires,
        t1_affine=subject.anat_affine,
        flair=subject.flair_hires,
        flair_affine=subject.anat_affine,
    )
    write_json_atomic(sub_dir / "phantom.json", {"subject_id": subject.subject_id, "n": HR_SIZE, "layout": "training",
                                                 "has_tumour": subject.has_tumour, "slices": subject.n_slices})
    return sub_dir


def write_phantom_subject(
    out_dir: str | os.PathLike[str],
    subject: "PhantomSubject",
    n: int,
    hr_masks: bool = False,
    snr_exponent: float = 1.0,
    convention: QcConvention | None = None,
) -> Path:
    """Write a phantom as a user's ``n x n`` scan plus its ground truth, under ``out_dir/<subject_id>/``.

    Input part: ``concs/raw`` = ``kspace_truncate(maps, n)[0]``, ``qc/`` = ``masks.lr_qc_maps`` at
    ``n x n`` (or the qc maps a site with ``convention`` writes, ``data.qc_conventions.acquired_qc``:
    none for ``missing``), ``t1``/``flair`` on the 128x128 anatomy grid, and with ``hr_masks`` the paper's 64x64
    quality masks in ``masks/`` (SR affine). Truth part: ``truth/concs/raw`` and ``truth/masks`` at
    64x64 (SR affine). Returns the subject folder.
    """
    if n not in LR_SIZES:
        raise ValueError(f"n={n} is not one of {LR_SIZES}")
    sub_dir = Path(out_dir) / subject.subject_id
    a_sr = subject.mrsi_affine_hr
    a_lr = lr_affine_for(a_sr, n)
    lr, _ = kspace_truncate(subject.maps, n)
    if convention is None:
        snr_lr, fwhm_lr = lr_qc_maps(subject, n, snr_exponent=snr_exponent)
    else:
        snr_lr, fwhm_lr = acquired_qc(subject.snr, subject.fwhm, n, convention) or (None, None)
    write_subject(
        sub_dir, lr, a_lr, snr=snr_lr, fwhm=fwhm_lr,
        t1=subject.t1_hires, t1_affine=subject.anat_affine,
        flair=subject.flair_hires, flair_affine=subject.anat_affine,
        masks=subject.masks if hr_masks else None, masks_affine=a_sr,
    )
    write_maps(sub_dir / "truth", subject.maps, a_sr)
    for c, name in enumerate(METABOLITES):
        _save(sub_dir / "truth" / "masks" / f"{name}.nii.gz", _vol_to_disk(subject.masks[:, c], np.uint8), a_sr)
    write_json_atomic(sub_dir / "phantom.json", {
        "subject_id": subject.subject_id, "n": n, "scale": HR_SIZE / n, "hr_masks": hr_masks,
        "has_tumour": subject.has_tumour, "slices": subject.n_slices, "snr_exponent": snr_exponent,
        "qc_convention": convention.to_dict() if convention is not None else None,
    })
    return sub_dir

