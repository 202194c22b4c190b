"""Deterministic synthetic glioma MRSI phantoms built on nilearn's MNI152 (ICBM 2009a) templates.

One subject (``make_subject``) = a random axial slab of ``Z`` (9..18) slices of 3.44 mm through the
cerebrum, seen through a random rigid + scaling + smooth elastic transform, with:

* 7 metabolite maps (``constants.METABOLITES``, mM-like units) on the 64x64 MRSI grid (220 mm FOV),
  made of tissue fractions (GM, WM, CSF, solid tumour, necrosis, edema) times per-subject
  concentrations, a per-subject gain, a smooth receive (bias) field, mild texture and noise;
* qc maps as FSL-MRS would write them: SNR and FWHM in ppm, plus lipid contamination along the brain
  rim; the quality mask is ``brain & SNR >= 2.5 & FWHM <= 0.15 & ~lipid`` per metabolite and the maps
  are zero outside it (the paper's "quality-filtered" ground truth);
* skull-stripped T1 (tumour dark) and FLAIR (CSF suppressed, edema bright) on a 128x128 grid of the
  same slab (``t1_hires``, ``flair_hires``, world affine ``anat_affine``) and block-averaged onto the
  64x64 grid (``t1``, ``flair``).

The anatomy (slab, lesions, T1 / FLAIR, grids and world frame) is ``data.phantom_anatomy``; the
metabolite maps and their qc ``data.phantom_metabolites``; a style's extra randomization
``data.phantom_styles``.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: the same ``(seed, index)`` gives
identical arrays. About 0.1-0.2 s per subject on one core after the templates are loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ftddm_trt.data.phantom_anatomy import (
    ANAT_SIZE,
    LABELS,
    add_lesions,
    anatomy_images,
    block_mean,
    grid_affines,
    mrsi_fractions,
    slab_tissue,
)
from ftddm_trt.data.phantom_metabolites import acquire, concentrations
from ftddm_trt.data.phantom_styles import PhantomStyle, SubjectDraw, get_style, style_rng

__all__ = [
    "PhantomSubject",
    "LABELS",
    "ANAT_SIZE",
    "make_subject",
    "generate_dataset",
    "fold_split",
    "subject_id_for",
    "subject_index",
]


@dataclass
class PhantomSubject:
    """One synthetic subject. Shapes: ``Z`` slices, ``C = 7`` metabolites, 64x64 in-plane (i = x, j = y).

    Attributes:
        subject_id: e.g. ``"sub-007"``.
        maps: ``(Z, C, 64, 64)`` float32, mM-like, zero outside ``masks`` (quality-filtered truth).
        masks: ``(Z, C, 64, 64)`` bool quality masks (the paper's 64x64 mask M).
        snr: ``(Z, C, 64, 64)`` float32 SNR of each 64x64 voxel (0 outside the brain).
        fwhm: ``(Z, C, 64, 64)`` float32 linewidth in ppm.
        t1, flair: ``(Z, 64, 64)`` float32 anatomy on the MRSI grid (arbitrary units, ~[0, 1]).
        brain: ``(Z, 64, 64)`` bool brain mask (brain fraction >= 0.5).
        labels: ``(Z, 64, 64)`` uint8 dominant tissue, names in ``LABELS``.
        t1_hires, flair_hires: ``(Z, 128, 128)`` float32 anatomy on its own grid.
        anat_affine: ``(4, 4)`` voxel -> world (mm) affine of the 128x128 anatomy grid.
        mrsi_affine_hr: ``(4, 4)`` voxel -> world (mm) affine of the 64x64 MRSI grid.
        has_tumour: whether a tumour was placed.
    """

    subject_id: str
    maps: NDArray[np.float32]
    masks: NDArray[np.bool_]
    snr: NDArray[np.float32]
    fwhm: NDArray[np.float32]
    t1: NDArray[np.float32]
    flair: NDArray[np.float32]
    brain: NDArray[np.bool_]
    labels: NDArray[np.uint8]
    t1_hires: NDArray[np.float32]
    flair_hires: NDArray[np.float32]
    anat_affine: NDArray[np.float64]
    mrsi_affine_hr: NDArray[np.float64]
    has_tumour: bool

    @property
    def n_slices(self) -> int:
        """Number of slices ``Z``."""
        return int(self.maps.shape[0])



def subject_id_for(index: int) -> str:
    """Subject id of phantom ``index`` (independent of the seed)."""
    return f"sub-{index:03d}"



def subject_index(subject_id: str) -> int:
    """Inverse of :func:`subject_id_for`: ``"sub-007"`` -> 7."""
    prefix = "sub-"
    if not subject_id.startswith(prefix) or not subject_id[len(prefix):].isdigit():
        raise ValueError(f"not a phantom subject id: {subject_id!r} (expected sub-NNN)")
    return int(subject_id[len(prefix):])



def make_subject(
    index: int, seed: int = 0, tumour_probability: float = 0.85, style: str | PhantomStyle = "classic"
) -> PhantomSubject:
    """Generate phantom subject ``index`` of the dataset drawn with ``seed`` (deterministic).

    Args:
        index: subject number (>= 0); the id is ``subject_id_for(index)``.
        seed: dataset seed.
        tumour_probability: chance that a ``classic`` subject has a tumour (other styles draw a
            lesion count from their own range, see ``data.phantom_styles``).
        style: a ``PhantomStyle`` or its name (``data.phantom_styles.STYLES``).

    Returns:
        a :class:`PhantomSubject`.
    """
    style = get_style(style) if isinstance(style, str) else style
    rng = np.random.default_rng([seed, index])
    draw = None if style.is_classic else SubjectDraw.draw(style, style_rng(seed, index, style))
    srng = None if style.is_classic else style_rng(seed, index + 10**6, style)
    # the order of the steps is the order of the draws from rng: changing it changes every subject
    tissue = add_lesions(slab_tissue(rng, draw, srng), rng, draw, srng, tumour_probability)
    t1_h, flair_h = anatomy_images(tissue, rng, draw)
    voxels = mrsi_fractions(tissue)
    acquired = acquire(concentrations(voxels, tissue, rng, draw), voxels, tissue, rng, draw, srng)
    mrsi_affine, anat_affine = grid_affines(tissue.n_slices)
    return PhantomSubject(
        subject_id=subject_id_for(index),
        maps=acquired.maps,
        masks=acquired.masks,
        snr=acquired.snr,
        fwhm=acquired.fwhm,
        t1=block_mean(t1_h),
        flair=block_mean(flair_h),
        brain=voxels.brain,
        labels=voxels.labels,
        t1_hires=t1_h,
        flair_hires=flair_h,
        anat_affine=anat_affine,
        mrsi_affine_hr=mrsi_affine,
        has_tumour=tissue.has_tumour,
    )


def generate_dataset(
    n_subjects: int = 25, seed: int = 0, styles: str | tuple[str, ...] = "classic"
) -> list[PhantomSubject]:
    """Subjects ``0 .. n_subjects - 1`` of the dataset drawn with ``seed``.

    ``styles``: one style name, or several assigned round-robin (subject ``i`` gets ``styles[i % len]``).
    """
    names = (styles,) if isinstance(styles, str) else tuple(styles)
    return [make_subject(i, seed, style=names[i % len(names)]) for i in range(n_subjects)]



def fold_split(n_subjects: int = 25, fold: int = 0, n_folds: int = 5) -> tuple[list[str], list[str], list[str]]:
    """Subject-wise cross-validation split (the paper's 15 / 5 / 5 for 25 subjects, 5 folds).

    Subjects are cut into ``n_folds`` consecutive groups; fold ``f`` tests on group ``f``, validates on
    group ``(f + 1) % n_folds`` and trains on the rest.

    Returns:
        ``(train_ids, val_ids, test_ids)`` lists of subject ids (``subject_id_for``).
    """
    if n_folds < 3 or n_subjects < n_folds:
        raise ValueError(f"need n_folds >= 3 and n_subjects >= n_folds, got {n_subjects=}, {n_folds=}")
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    groups = np.array_split(np.arange(n_subjects), n_folds)
    test = groups[fold]
    val = groups[(fold + 1) % n_folds]
    train = np.concatenate([g for k, g in enumerate(groups) if k not in (fold, (fold + 1) % n_folds)])
    ids = lambda a: [subject_id_for(int(i)) for i in a]  # noqa: E731
    return ids(train), ids(val), ids(test)

