"""Reading and writing subjects in the FSL-MRS (``fsl_mrsi``) layout; the only ``(Z, ...) <-> (X, Y, Z)`` transpose.

Layout of one subject folder (every file a 3D NIfTI, arrays ``(X, Y, Z)`` on disk)::

    SUBJECT/
      concs/<kind>/<metab>.nii.gz        kind in raw | internal | molarity | molality; N x N x Z, MRSI affine;
                                         fsl_mrsi's names are read as ``data.fsl_names`` says (Cr+PCr, NAA+NAAG, ...)
      qc/<metab>_snr.nii.gz              optional, N x N x Z (acquired grid); a combination's qc is derived
      qc/<metab>_fwhm.nii.gz             from its parts' (``data.qc_combine``); FWHM in ppm
      masks/<metab>.nii.gz               optional explicit per-metabolite masks (any grid)
      mask.nii.gz                        optional explicit mask shared by all metabolites (any grid)
      t1.nii.gz, flair.nii.gz            optional, their own grid and affine
      uncertainties/<metab>_sd.nii.gz    written for super-resolved outputs (``write_maps``)
      truth/concs/raw/<metab>.nii.gz     phantoms only: 64x64 ground truth (SR affine); never read as input
      truth/masks/<metab>.nii.gz         phantoms only: 64x64 quality masks
      phantom.json                       phantoms only: metadata

Affines (centred grid, see ``data.kspace``): acquired voxel ``k`` and 64x64 voxel ``s * k`` are the same
world point, and voxel 0 of both grids is the same point. Hence ``A_SR = A_LR @ diag(1/s, 1/s, 1, 1)``
exactly (no half-voxel shift: that shift belongs to the corner-aligned convention, not to FFT grids).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import nibabel as nib
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from ftddm_trt.atomic import atomic_file, write_json_atomic
from ftddm_trt.constants import HR_SIZE, LR_SIZES, METABOLITES
from ftddm_trt.data.fsl_names import NAMING, MapFile, nifti_stem, resolve_maps
from ftddm_trt.data.kspace import kspace_truncate
from ftddm_trt.data.masks import SIGNAL_FRACTION, lr_qc_maps, lr_support_mask, support_mask_from_lr
from ftddm_trt.data.qc_combine import combine_fwhm, combine_snr
from ftddm_trt.data.qc_conventions import QcConvention, acquired_qc

if TYPE_CHECKING:
    from ftddm_trt.data.phantom import PhantomSubject

__all__ = [
    "InputError",
    "SubjectInput",
    "CONC_KINDS",
    "METABOLITE_ALIASES",
    "sr_affine",
    "lr_affine_for",
    "write_subject",
    "write_maps",
    "write_phantom_subject",
    "write_training_subject",
    "read_subject",
    "read_map_folder",
]

#: FSL-MRS concentration folders, in the order ``read_subject`` tries them.
CONC_KINDS: tuple[str, ...] = ("raw", "internal", "molarity", "molality")

#: File stems accepted for each metabolite, in the order they are tried (``data.fsl_names``).
METABOLITE_ALIASES: dict[str, tuple[str, ...]] = {
    m: tuple(dict.fromkeys(stem for stem, _ in NAMING[m].candidates())) for m in METABOLITES}

_AFFINE_TOL_MM = 1e-3


class InputError(ValueError):
    """A problem with an input file; the message always starts with the file (or folder) it concerns."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class SubjectInput:
    """One subject as read from disk. ``Z`` slices, ``M`` metabolites present, ``n x n`` acquired grid.

    Attributes:
        path: subject folder.
        lr: ``(Z, M, n, n)`` float32 acquired maps in file units.
        n: acquired in-plane size; ``scale`` = ``64 / n``.
        affine_lr, affine_sr: ``(4, 4)`` voxel -> world (mm) of the acquired and the 64x64 grids.
        metabolites: the ``M`` canonical names present, in ``constants.METABOLITES`` order.
        kind: concentration folder read (``raw``, ``internal``, ...).
        mask: ``(Z, M, 64, 64)`` bool mask M on the SR grid (always filled; ``None`` only if built by hand).
        mask_source: ``"masks"`` | ``"mask"`` | ``"signal"``.
        fine_mask: True when M is a quality mask on a finer grid than the acquisition (the paper's
            ``hr`` protocol), False when it comes from the acquired grid (the ``lr`` protocol).
        snr, fwhm: ``(Z, M, n, n)`` float32 qc maps if present (FWHM in ppm), else ``None``.
        t1, flair: ``(Z, 64, 64)`` float32 anatomy resampled onto the SR grid, or ``None`` if absent.
        skipped: concentration files that were not read (other spectra, parts of a combination read).
        notes: human-readable remarks (e.g. why the fallback mask was used).
        missing: metabolites of ``constants.METABOLITES`` with no map in the folder.
        sources: metabolite -> ``{"map": file, "snr": [files], "fwhm": [files]}`` (paths relative to ``path``):
            which files fed each output.
        header: the NIfTI header of the first map read; outputs keep its sform/qform codes, units and intent.
        anatomy_coverage: ``{"t1": f, "flair": f}``, the share of the voxels with signal (mask M of any
            metabolite) on the 64x64 grid that the image's field of view covers.
    """

    path: Path
    lr: NDArray[np.float32]
    n: int
    scale: float
    affine_lr: NDArray[np.float64]
    affine_sr: NDArray[np.float64]
    metabolites: tuple[str, ...]
    kind: str
    mask: NDArray[np.bool_] | None
    mask_source: str
    snr: NDArray[np.float32] | None = None
    fwhm: NDArray[np.float32] | None = None
    t1: NDArray[np.float32] | None = None
    flair: NDArray[np.float32] | None = None
    skipped: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    fine_mask: bool = False
    missing: tuple[str, ...] = ()
    sources: dict[str, dict[str, object]] = field(default_factory=dict)
    header: nib.Nifti1Header | None = None
    anatomy_coverage: dict[str, float] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        """Number of slices ``Z``."""
        return int(self.lr.shape[0])

    def select(self, metabolites: Sequence[str]) -> None:
        """Keep only ``metabolites`` (present ones, in the given order): maps, masks and qc maps alike."""
        keep = [self.metabolites.index(m) for m in metabolites]
        self.lr = self.lr[:, keep]
        if self.mask is not None:
            self.mask = self.mask[:, keep]
        if self.snr is not None and self.fwhm is not None:
            self.snr, self.fwhm = self.snr[:, keep], self.fwhm[:, keep]
        self.metabolites = tuple(metabolites)
        self.sources = {m: self.sources[m] for m in metabolites if m in self.sources}


# --------------------------------------------------------------------------------------- affines


def sr_affine(lr_affine: ArrayLike, n: int, size: int = HR_SIZE) -> NDArray[np.float64]:
    """Affine of the ``size x size`` SR grid from the affine of the ``n x n`` acquired grid.

    ``A_SR = A_LR @ diag(n / size, n / size, 1, 1)``: SR voxel ``s * k`` lands on acquired voxel ``k``.
    """
    return np.asarray(lr_affine, dtype=np.float64) @ np.diag([n / size, n / size, 1.0, 1.0])


def lr_affine_for(sr_affine_: ArrayLike, n: int, size: int = HR_SIZE) -> NDArray[np.float64]:
    """Affine of an ``n x n`` acquisition of the same FOV as the ``size x size`` grid ``sr_affine_``."""
    return np.asarray(sr_affine_, dtype=np.float64) @ np.diag([size / n, size / n, 1.0, 1.0])


# --------------------------------------------------------------------------------------- writing


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


# --------------------------------------------------------------------------------------- reading


def _load(path: Path, what: str = "map") -> tuple[NDArray[np.float32], NDArray[np.float64]]:
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


def _stem(p: Path) -> str:
    return nifti_stem(p)


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))


def _match_metabolites(files: list[Path], suffix: str = "") -> tuple[dict[str, Path], list[Path]]:
    """Map canonical metabolite -> file (stem minus ``suffix``) by ``fsl_names.resolve_maps``; rest skipped."""
    found, skipped, _notes = resolve_maps(files, suffix)
    return {m: f.path for m, f in found.items()}, skipped


def _qc_files(qc: list[Path], found: dict[str, MapFile], suffix: str) -> dict[str, list[Path]]:
    """The qc files (``<stem><suffix>``) describing each metabolite: the map's own stem's, else every
    component's (a combination: ``qc/Cr_snr`` and ``qc/PCr_snr`` for ``Cr+PCr``); metabolites lacking one are
    left out."""
    by_stem = {_stem(p).lower(): p for p in qc}
    out: dict[str, list[Path]] = {}
    for m, f in found.items():
        own = by_stem.get(f"{_stem(f.path)}{suffix}".lower())
        parts = [by_stem.get(f"{c}{suffix}".lower()) for c in f.components]
        if own is not None:
            out[m] = [own]
        elif all(p is not None for p in parts):
            out[m] = [p for p in parts if p is not None]
    return out


def _inside_extent(src_shape: tuple[int, ...], src_affine: NDArray, dst_affine: NDArray,
                   dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.bool_]:
    """``(X, Y, Z)`` bool: destination voxel centres inside the source image's field of view."""
    v = _sr_points_in(src_affine, dst_affine, dst_shape_xyz)
    inside = np.ones(dst_shape_xyz, dtype=bool)
    for a in range(3):
        inside &= (v[a] >= -0.5) & (v[a] <= src_shape[a] - 0.5)
    return inside


def _check_lr_grid(path: Path, data: NDArray) -> int:
    nx, ny, _ = data.shape
    if nx != ny:
        raise InputError(path, f"in-plane size {nx}x{ny} is not square")
    if nx % 2:
        raise InputError(path, f"in-plane size {nx} is odd (acquired sizes are even: {LR_SIZES})")
    if nx > HR_SIZE:
        raise InputError(path, f"in-plane size {nx} is larger than the {HR_SIZE}x{HR_SIZE} output grid")
    if nx not in LR_SIZES:
        raise InputError(path, f"in-plane size {nx} is not a supported acquisition size {LR_SIZES}")
    return nx


def _same_grid(path: Path, ref_path: Path, data: NDArray, aff: NDArray, ref_shape: tuple, ref_aff: NDArray) -> None:
    if data.shape != ref_shape:
        what = "slice count" if data.shape[:2] == ref_shape[:2] else "shape"
        raise InputError(path, f"{what} {data.shape} differs from {ref_path.name} {ref_shape}")
    if not np.allclose(aff, ref_aff, atol=_AFFINE_TOL_MM):
        raise InputError(path, f"affine differs from {ref_path.name}:\n{aff}\nvs\n{ref_aff}")


def _sr_points_in(src_affine: NDArray, dst_affine: NDArray, dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.float64]:
    """Voxel coordinates in the source grid of every destination voxel centre: ``(3, X, Y, Z)``."""
    m = np.linalg.inv(src_affine) @ dst_affine
    idx = np.indices(dst_shape_xyz, dtype=np.float64)
    return np.einsum("ab,bxyz->axyz", m[:3, :3], idx) + m[:3, 3][:, None, None, None]


def _nearest_onto(path: Path, vol: NDArray, src_affine: NDArray, dst_affine: NDArray,
                  dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.bool_]:
    """Nearest-neighbour resampling of a mask ``(X, Y, Z)`` onto another grid; outside -> False.

    A destination voxel takes source voxel ``floor(v + 1/2)``; it counts as inside when ``v`` lies within
    half a source voxel beyond the edge voxels' footprints (``-1 <= v <= N``), clipped to the edge voxel,
    which matches ``masks.upsample_nearest`` for an acquired-grid mask.
    """
    v = _sr_points_in(src_affine, dst_affine, dst_shape_xyz)
    inside = np.ones(dst_shape_xyz, dtype=bool)
    idx = []
    for a in range(3):
        inside &= (v[a] >= -1.0 - 1e-6) & (v[a] <= vol.shape[a] + 1e-6)
        idx.append(np.clip(np.floor(v[a] + 0.5).astype(np.intp), 0, vol.shape[a] - 1))
    if not inside.any():
        raise InputError(path, "mask does not overlap the MRSI field of view")
    return inside & (vol[idx[0], idx[1], idx[2]] > 0.5)


def _linear_onto(path: Path, vol: NDArray, src_affine: NDArray, dst_affine: NDArray,
                 dst_shape_xyz: tuple[int, int, int]) -> NDArray[np.float32]:
    """Linear resampling of an image ``(X, Y, Z)`` onto another grid (0 outside).

    Source axes sampled more than 2.5x finer than the destination's in-plane voxels are first smoothed
    with a Gaussian of ``0.4 r`` voxels (``r`` = destination step in source voxels) against aliasing.
    """
    v = _sr_points_in(src_affine, dst_affine, dst_shape_xyz)
    inside = _inside_extent(vol.shape, src_affine, dst_affine, dst_shape_xyz)
    if inside.mean() < 0.01:
        raise InputError(
            path, f"image does not overlap the MRSI field of view ({100 * inside.mean():.1f}% of it covered)"
        )
    jac = np.abs((np.linalg.inv(src_affine) @ dst_affine)[:3, :2]).max(axis=1)  # src voxels per in-plane SR step
    sigma = np.where(jac > 2.5, 0.4 * jac, 0.0)
    src = ndimage.gaussian_filter(vol, sigma, mode="nearest") if np.any(sigma > 0) else vol
    out = ndimage.map_coordinates(src, v.reshape(3, -1), order=1, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(dst_shape_xyz).astype(np.float32)


def _find_file(folder: Path, stem: str) -> Path | None:
    for p in _nifti_files(folder):
        if _stem(p).lower() == stem.lower():
            return p
    return None


def read_subject(path: str | os.PathLike[str], kind: str | None = None) -> SubjectInput:
    """Read an FSL-MRS subject folder (layout in the module docstring) for super-resolution.

    Args:
        path: subject folder.
        kind: concentration folder to read; by default the first of ``CONC_KINDS`` with maps.

    Returns:
        a :class:`SubjectInput`; ``mask`` is taken from, in order: ``masks/<metab>`` (``"masks"``),
        ``mask.nii.gz`` (``"mask"``) -- any grid, nearest-neighbour onto the SR grid, and masks on the
        acquired grid itself go through ``support_mask_from_lr`` --, else the acquired maps' own
        signal (``"signal"``: ``data.masks.lr_support_mask``, whatever the qc maps' convention).

    Raises:
        InputError: naming the offending file, for every problem with the inputs.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(root, "subject folder does not exist")
    concs = root / "concs"
    if not concs.is_dir():
        raise InputError(concs, "missing concs folder (expected concs/<kind>/<metab>.nii.gz, FSL-MRS layout)")
    kinds = (kind,) if kind is not None else CONC_KINDS
    maps: dict[str, MapFile] = {}
    skipped: list[Path] = []
    naming_notes: list[str] = []
    chosen = ""
    for k in kinds:
        maps, skipped, naming_notes = resolve_maps(_nifti_files(concs / k))
        if maps:
            chosen = k
            break
    found = {m: f.path for m, f in maps.items()}
    if not found:
        where = concs / kinds[0] if kind is not None else concs
        raise InputError(where, f"no metabolite maps found in {'/'.join(kinds)} (expected e.g. "
                                f"{', '.join(m + '.nii.gz' for m in METABOLITES)})")
    names = tuple(found)

    ref_path = found[names[0]]
    header = _header(ref_path)
    vols = []
    ref_shape: tuple = ()
    ref_aff = np.eye(4)
    for i, m in enumerate(names):
        data, aff = _load(found[m])
        _check_lr_grid(found[m], data)
        if i == 0:
            ref_shape, ref_aff = data.shape, aff
        else:
            _same_grid(found[m], ref_path, data, aff, ref_shape, ref_aff)
        vols.append(data)
    n = ref_shape[0]
    z = ref_shape[2]
    lr = np.stack([v.transpose(2, 0, 1) for v in vols], axis=1).astype(np.float32)  # (Z, M, n, n)
    a_sr = sr_affine(ref_aff, n)
    sr_shape = (HR_SIZE, HR_SIZE, z)
    missing = tuple(m for m in METABOLITES if m not in names)
    notes: list[str] = list(naming_notes)
    if missing:
        notes.append(f"no map for {', '.join(missing)} in {concs / chosen} (looked for "
                     f"{'; '.join(_looked_for(m) for m in missing)}): not written")

    # qc maps on the acquired grid; a combination's from its parts' (data.qc_combine)
    snr = fwhm = None
    qc_dir = root / "qc"
    snr_files = _qc_files(_nifti_files(qc_dir), maps, "_snr")
    fwhm_files = _qc_files(_nifti_files(qc_dir), maps, "_fwhm")
    if all(m in snr_files and m in fwhm_files for m in names):
        qc = []
        for files, combine in ((snr_files, combine_snr), (fwhm_files, combine_fwhm)):
            stack = []
            for m in names:
                parts = []
                for f in files[m]:
                    data, aff = _load(f, "qc map")
                    _same_grid(f, ref_path, data, aff, ref_shape, ref_aff)
                    parts.append(data.transpose(2, 0, 1))
                stack.append(combine(parts))
            qc.append(np.stack(stack, axis=1).astype(np.float32))
        snr, fwhm = qc
    elif qc_dir.is_dir():
        missing = [m for m in names if m not in snr_files or m not in fwhm_files]
        notes.append(f"qc maps incomplete (missing snr/fwhm for {', '.join(missing)}): not used")

    # mask M
    mask: NDArray[np.bool_]
    masks_dir = root / "masks"
    mask_files, _ = _match_metabolites(_nifti_files(masks_dir))
    shared = _find_file(root, "mask")

    grids: list[bool] = []  # per mask file read: True when finer than the acquired grid

    def explicit(p: Path) -> NDArray[np.bool_]:
        data, aff = _load(p, "mask")
        grids.append(not (data.shape == ref_shape and np.allclose(aff, ref_aff, atol=_AFFINE_TOL_MM)))
        if not grids[-1]:
            return support_mask_from_lr(data.transpose(2, 0, 1) > 0.5)  # acquired grid: lr protocol
        return _nearest_onto(p, data, aff, a_sr, sr_shape).transpose(2, 0, 1)

    if masks_dir.is_dir() and mask_files:
        missing = [m for m in names if m not in mask_files]
        if missing:
            if shared is None:
                raise InputError(masks_dir, f"no mask for {', '.join(missing)} (and no mask.nii.gz)")
            notes.append(f"masks/ lacks {', '.join(missing)}: using mask.nii.gz for them")
        per = [explicit(mask_files[m]) if m in mask_files else explicit(shared) for m in names]  # type: ignore[arg-type]
        mask, source = np.stack(per, axis=1), "masks"
    elif shared is not None:
        one = explicit(shared)
        mask, source = np.repeat(one[:, None], len(names), axis=1), "mask"
    else:
        mask, source = lr_support_mask(lr), "signal"
        notes.append(f"mask M = the acquired maps' signal (above {SIGNAL_FRACTION:.0%} of each map's robust max), "
                     "dilated by one acquired voxel; qc maps do not enter M")

    # anatomy, and how much of the voxels with signal its field of view covers
    anat: dict[str, NDArray[np.float32] | None] = {}
    coverage: dict[str, float] = {}
    signal = np.asarray(mask, dtype=bool).any(axis=1)  # (Z, 64, 64)
    for name in ("t1", "flair"):
        p = _find_file(root, name)
        if p is None:
            anat[name] = None
            continue
        data, aff = _load(p, "image")
        anat[name] = _linear_onto(p, data, aff, a_sr, sr_shape).transpose(2, 0, 1).copy()
        inside = _inside_extent(data.shape, aff, a_sr, sr_shape).transpose(2, 0, 1)
        coverage[name] = float(inside[signal].mean()) if signal.any() else float(inside.mean())

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    sources: dict[str, dict[str, object]] = {
        m: {"map": rel(found[m]), "components": list(maps[m].components),
            "snr": [rel(f) for f in snr_files.get(m, [])] if snr is not None else [],
            "fwhm": [rel(f) for f in fwhm_files.get(m, [])] if fwhm is not None else []}
        for m in names}

    return SubjectInput(
        path=root, lr=lr, n=n, scale=HR_SIZE / n, affine_lr=ref_aff, affine_sr=a_sr, metabolites=names,
        kind=chosen, mask=np.ascontiguousarray(mask, dtype=bool), mask_source=source, snr=snr, fwhm=fwhm,
        t1=anat["t1"], flair=anat["flair"], skipped=tuple(p.name for p in skipped), notes=notes,
        fine_mask=bool(grids) and all(grids), missing=missing, sources=sources, header=header,
        anatomy_coverage=coverage,
    )


def _header(path: Path) -> nib.Nifti1Header | None:
    """A copy of a NIfTI file's header (None for an image type without a NIfTI-1 header)."""
    try:
        h = nib.load(str(path)).header
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    return nib.Nifti1Header.from_header(h) if isinstance(h, nib.Nifti1Header) else None


def _looked_for(metabolite: str) -> str:
    """The file names a metabolite is read from (``data.fsl_names``), for messages."""
    from_names = [stem for stem, _ in NAMING[metabolite].candidates()]
    return "/".join(dict.fromkeys(from_names)) + ".nii.gz"


def read_map_folder(
    folder: str | os.PathLike[str],
    metabolites: Sequence[str] | None = None,
    subfolder: str | None = "concs",
    kind: str | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float64], tuple[str, ...]]:
    """Read per-metabolite 3D maps of any grid (outputs, truth, masks) into ``(Z, M, X, Y)``.

    Args:
        folder: a folder written by ``write_maps`` (e.g. an output or ``SUBJECT/truth``).
        metabolites: names to read (all must exist); default: every known metabolite present.
        subfolder: ``"concs"`` reads ``concs/<kind>/`` (first of ``CONC_KINDS`` with maps unless ``kind``
            is given); ``None`` reads ``folder`` itself (e.g. ``masks/``); any other string is a
            sub-path of ``folder``.
        kind: concentration folder when ``subfolder == "concs"``.

    Returns:
        ``(maps, affine, metabolites)`` with maps float32 ``(Z, M, X, Y)`` in file units.

    Raises:
        InputError: missing folder or maps, 4D/NaN files, grids that differ between metabolites.
    """
    root = Path(folder)
    if subfolder is None:
        candidates = [root]
    elif subfolder == "concs":
        candidates = [root / "concs" / k for k in ((kind,) if kind else CONC_KINDS)]
    else:
        candidates = [root / subfolder]
    found: dict[str, Path] = {}
    where = candidates[0]
    for cand in candidates:
        found, _ = _match_metabolites(_nifti_files(cand))
        if found:
            where = cand
            break
    if not found:
        missing = where if len(candidates) == 1 else root / "concs"
        raise InputError(missing, "no metabolite maps found")
    if metabolites is not None:
        lacking = [m for m in metabolites if m not in found]
        if lacking:
            raise InputError(where, f"no map for {', '.join(lacking)}")
        names = tuple(metabolites)
    else:
        names = tuple(found)
    vols = []
    ref_shape: tuple = ()
    ref_aff = np.eye(4)
    for i, m in enumerate(names):
        data, aff = _load(found[m])
        if i == 0:
            ref_shape, ref_aff = data.shape, aff
        else:
            _same_grid(found[m], found[names[0]], data, aff, ref_shape, ref_aff)
        vols.append(data.transpose(2, 0, 1))
    return np.stack(vols, axis=1).astype(np.float32), ref_aff, names
