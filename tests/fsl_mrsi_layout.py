"""Build a subject folder the way ``fsl_mrsi --combine Cr PCr --combine GPC PCh --combine NAA NAAG`` writes it.

From a phantom subject (canonical names): every total split into its fitted parts (``Cr`` 60 % and
``PCr`` 40 % of tCr, ...), the combination written beside the parts under the joined name, ``concs/raw``
and ``concs/internal`` (raw times 8 over the voxel's Cr+PCr, bounded below by its median: a per-voxel
scale as FSL-MRS applies), qc maps only for the fitted parts (their SNR split in the same shares, so the parts' SNR
sums to the phantom's), ``uncertainties/<metab>_sd``; every image saved as fsl_mrsi saves it:
``nib.Nifti1Image(data, affine)`` (sform code 2, qform code 0, units unknown).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

#: canonical metabolite -> (fitted part, share) and the name fsl_mrsi gives the combination
SPLITS: dict[str, tuple[tuple[tuple[str, float], ...], str | None]] = {
    "tCr": ((("Cr", 0.6), ("PCr", 0.4)), "Cr+PCr"),
    "tCho": ((("GPC", 0.7), ("PCh", 0.3)), "GPC+PCh"),
    "NAA": ((("NAA", 0.9), ("NAAG", 0.1)), "NAA+NAAG"),
    "Glu": ((("Glu", 1.0),), None),
    "Ins": ((("Ins", 1.0),), None),
    "Gln": ((("Gln", 1.0),), None),
    "Gly": ((("Gly", 1.0),), None),
}


def _read(p: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(p))
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


def _save(p: Path, data: np.ndarray, affine: np.ndarray) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(p))  # as fsl_mrsi: no header given


def fsl_mrsi_subject(phantom_dir: Path, out: Path) -> Path:
    """Write ``out`` from the phantom subject ``phantom_dir`` (its anatomy copied as a user adds it)."""
    raw: dict[str, np.ndarray] = {}
    affine = None
    for met, (parts, combined) in SPLITS.items():
        total, affine = _read(phantom_dir / "concs" / "raw" / f"{met}.nii.gz")
        snr, _ = _read(phantom_dir / "qc" / f"{met}_snr.nii.gz")
        fwhm, _ = _read(phantom_dir / "qc" / f"{met}_fwhm.nii.gz")
        for name, share in parts:
            raw[name] = share * total
            _save(out / "qc" / f"{name}_snr.nii.gz", share * snr, affine)
            _save(out / "qc" / f"{name}_fwhm.nii.gz", fwhm, affine)
        if combined is not None:
            raw[combined] = total
    ref = raw["Cr+PCr"]
    scale = 8.0 / np.clip(ref, np.median(ref[ref > 0]), None)  # bounded where the reference is weak
    for name, data in raw.items():
        _save(out / "concs" / "raw" / f"{name}.nii.gz", data, affine)
        _save(out / "concs" / "internal" / f"{name}.nii.gz", data * scale, affine)
        _save(out / "uncertainties" / f"{name}_sd.nii.gz", 0.1 * data, affine)
    for name in ("t1.nii.gz", "flair.nii.gz"):
        shutil.copy2(phantom_dir / name, out / name)
    return out
