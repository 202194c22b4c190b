"""Reading subjects and maps in the FSL-MRS (``fsl_mrsi``) layout; on-disk ``(X, Y, Z)`` becomes ``(Z, ...)``.

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

The writers of this layout are in ``data.nifti.write``; the grids' affines and the resampling of masks
and images onto the 64x64 grid in ``data.nifti.resample``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from ftddm_trt.constants import HR_SIZE, LR_SIZES, METABOLITES
from ftddm_trt.data.fsl_names import NAMING, MapFile, nifti_stem, resolve_maps
from ftddm_trt.data.masks import SIGNAL_FRACTION, lr_support_mask, support_mask_from_lr
from ftddm_trt.data.nifti.files import (
    AFFINE_TOL_MM,
    InputError,
    find_file,
    load_volume,
    match_metabolites,
    nifti_files,
    same_grid,
)
from ftddm_trt.data.nifti.resample import inside_extent, linear_onto, nearest_onto, sr_affine
from ftddm_trt.data.qc_combine import combine_fwhm, combine_snr

__all__ = ["SubjectInput", "CONC_KINDS", "METABOLITE_ALIASES", "read_subject", "read_map_folder"]

#: FSL-MRS concentration folders, in the order ``read_subject`` tries them.
CONC_KINDS: tuple[str, ...] = ("raw", "internal", "molarity", "molality")

#: File stems accepted for each metabolite, in the order they are tried (``data.fsl_names``).
METABOLITE_ALIASES: dict[str, tuple[str, ...]] = {
    m: tuple(dict.fromkeys(stem for stem, _ in NAMING[m].candidates())) for m in METABOLITES}


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


def _qc_files(qc: list[Path], found: dict[str, MapFile], suffix: str) -> dict[str, list[Path]]:
    """The qc files (``<stem><suffix>``) describing each metabolite: the map's own stem's, else every
    component's (a combination: ``qc/Cr_snr`` and ``qc/PCr_snr`` for ``Cr+PCr``); metabolites lacking one are
    left out."""
    by_stem = {nifti_stem(p).lower(): p for p in qc}
    out: dict[str, list[Path]] = {}
    for m, f in found.items():
        own = by_stem.get(f"{nifti_stem(f.path)}{suffix}".lower())
        parts = [by_stem.get(f"{c}{suffix}".lower()) for c in f.components]
        if own is not None:
            out[m] = [own]
        elif all(p is not None for p in parts):
            out[m] = [p for p in parts if p is not None]
    return out


def _load_maps(
    files: dict[str, Path], names: Sequence[str], check: Callable[[Path, NDArray], object] | None = None
) -> tuple[NDArray[np.float32], tuple[int, ...], NDArray[np.float64]]:
    """The maps ``files[m]`` of ``names`` on one grid: ``(Z, M, X, Y)`` float32, the first file's on-disk shape
    ``(X, Y, Z)`` and its affine. ``check(path, data)`` looks at each file as it is read; a file on another
    grid than the first is an ``InputError``."""
    vols = []
    ref_shape: tuple[int, ...] = ()
    ref_aff = np.eye(4)
    for i, m in enumerate(names):
        data, aff = load_volume(files[m])
        if check is not None:
            check(files[m], data)
        if i == 0:
            ref_shape, ref_aff = data.shape, aff
        else:
            same_grid(files[m], files[names[0]], data, aff, ref_shape, ref_aff)
        vols.append(data.transpose(2, 0, 1))
    return np.stack(vols, axis=1).astype(np.float32), ref_shape, ref_aff


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
        maps, skipped, naming_notes = resolve_maps(nifti_files(concs / k))
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
    lr, ref_shape, ref_aff = _load_maps(found, names, _check_lr_grid)  # (Z, M, n, n)
    n = ref_shape[0]
    z = ref_shape[2]
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
    snr_files = _qc_files(nifti_files(qc_dir), maps, "_snr")
    fwhm_files = _qc_files(nifti_files(qc_dir), maps, "_fwhm")
    if all(m in snr_files and m in fwhm_files for m in names):
        qc = []
        for files, combine in ((snr_files, combine_snr), (fwhm_files, combine_fwhm)):
            stack = []
            for m in names:
                parts = []
                for f in files[m]:
                    data, aff = load_volume(f, "qc map")
                    same_grid(f, ref_path, data, aff, ref_shape, ref_aff)
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
    mask_files, _ = match_metabolites(nifti_files(masks_dir))
    shared = find_file(root, "mask")

    grids: list[bool] = []  # per mask file read: True when finer than the acquired grid

    def explicit(p: Path) -> NDArray[np.bool_]:
        data, aff = load_volume(p, "mask")
        grids.append(not (data.shape == ref_shape and np.allclose(aff, ref_aff, atol=AFFINE_TOL_MM)))
        if not grids[-1]:
            return support_mask_from_lr(data.transpose(2, 0, 1) > 0.5)  # acquired grid: lr protocol
        return nearest_onto(p, data, aff, a_sr, sr_shape).transpose(2, 0, 1)

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
        p = find_file(root, name)
        if p is None:
            anat[name] = None
            continue
        data, aff = load_volume(p, "image")
        anat[name] = linear_onto(p, data, aff, a_sr, sr_shape).transpose(2, 0, 1).copy()
        inside = inside_extent(data.shape, aff, a_sr, sr_shape).transpose(2, 0, 1)
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
        found, _ = match_metabolites(nifti_files(cand))
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
    maps, _, ref_aff = _load_maps(found, names)
    return maps, ref_aff, names

