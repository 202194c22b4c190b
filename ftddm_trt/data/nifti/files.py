"""Finding and loading the NIfTI files of a subject folder: the checks every reader shares.

``load_volume`` turns every failure into an ``InputError`` naming the file; ``nifti_files``,
``match_metabolites`` and ``find_file`` find files by their FSL-MRS names (``data.fsl_names``);
``same_grid`` refuses files whose shape or affine differ from a reference file's.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from ftddm_trt.data.fsl_names import nifti_stem, resolve_maps

__all__ = ["AFFINE_TOL_MM", "InputError", "load_volume", "nifti_files", "match_metabolites", "find_file",
           "same_grid"]

#: Largest difference (mm) between two affines' entries for their grids to count as the same.
AFFINE_TOL_MM = 1e-3


class InputError(ValueError):
    """A problem with an input file; the message always starts with the file (or folder) it concerns."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def load_volume(path: Path, what: str = "map") -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Load a 3D NIfTI as ``(X, Y, Z)`` float32 + affine; every failure becomes an ``InputError``."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except InputError:
        raise
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, ValueError...
        raise InputError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InputError(path, f"{data.ndim}D image of shape {data.shape} where a 3D {what} is expected")
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine contains NaN/Inf")
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} voxels are NaN/Inf")
    return data, affine


def nifti_files(folder: Path) -> list[Path]:
    """The ``.nii`` / ``.nii.gz`` files directly in ``folder``, sorted; none when it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))


def match_metabolites(files: list[Path], suffix: str = "") -> tuple[dict[str, Path], list[Path]]:
    """Map canonical metabolite -> file (stem minus ``suffix``) by ``fsl_names.resolve_maps``; rest skipped."""
    found, skipped, _notes = resolve_maps(files, suffix)
    return {m: f.path for m, f in found.items()}, skipped


def find_file(folder: Path, stem: str) -> Path | None:
    """The NIfTI file of ``folder`` named ``stem`` (``stem.nii`` or ``stem.nii.gz``, any case), else None."""
    for p in nifti_files(folder):
        if nifti_stem(p).lower() == stem.lower():
            return p
    return None


def same_grid(path: Path, ref_path: Path, data: NDArray, aff: NDArray, ref_shape: tuple, ref_aff: NDArray) -> None:
    """Refuse (``InputError`` naming ``path``) a volume whose ``(X, Y, Z)`` shape or affine (within
    ``AFFINE_TOL_MM``) differs from the reference file ``ref_path``'s ``ref_shape`` / ``ref_aff``."""
    if data.shape != ref_shape:
        what = "slice count" if data.shape[:2] == ref_shape[:2] else "shape"
        raise InputError(path, f"{what} {data.shape} differs from {ref_path.name} {ref_shape}")
    if not np.allclose(aff, ref_aff, atol=AFFINE_TOL_MM):
        raise InputError(path, f"affine differs from {ref_path.name}:\n{aff}\nvs\n{ref_aff}")

