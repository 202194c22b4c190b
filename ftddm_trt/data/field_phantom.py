"""The ``fields`` phantom family: metabolite maps from random fields and textures, not tissue fractions.

Each metabolite map is a random mean level, modulated by a smooth Gaussian random field shared by all
metabolites (partial correlation), a field of its own and a texture (band-pass noise, warped stripes or
Voronoi cells), sometimes with a sharp step across a random plane. A random number of focal lesions
(ellipsoids or ragged blobs from thresholded fields, sharp or soft edged) raise tCho, Gln and Gly and
lower NAA. SNR is proportional to the concentration, a receive-coil sensitivity from a ring of coil
elements and a few low-SNR dips, scaled per subject and metabolite so that most brain voxels pass; the
linewidth is a smooth field that broadens near the brain edge and in a few (often inferior,
sinus-like) patches. The quality mask is brain & SNR >= 2.5 & FWHM <= 0.15 ppm & a ragged rim
exclusion at the brain edge (:func:`rim_keep`). Anatomy comes from the lesion-free ``classic`` subject
of the same index and seed, so lesions of this family are not visible on T1/FLAIR.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from ftddm_trt.constants import FWHM_MAX_PPM, METABOLITES, SNR_MIN
from ftddm_trt.data.phantom import PhantomSubject, make_subject

#: Typical brain level range (mM) of each metabolite; a subject's mean is drawn in the inner 80 %.
LEVEL_RANGES: dict[str, tuple[float, float]] = {
    "tCr": (5.0, 9.0), "tCho": (1.0, 2.0), "NAA": (7.0, 11.0), "Glu": (6.0, 11.0),
    "Ins": (4.0, 7.0), "Gln": (1.5, 4.5), "Gly": (0.3, 1.1),
}
#: Range of the multiplier a lesion applies to each metabolite at its centre.
LESION_FACTORS: dict[str, tuple[float, float]] = {
    "tCr": (0.6, 1.1), "tCho": (2.0, 4.0), "NAA": (0.1, 0.4), "Glu": (0.5, 1.0),
    "Ins": (0.7, 1.8), "Gln": (1.3, 2.5), "Gly": (1.5, 3.0),
}
FWHM_RANGE_PPM: tuple[float, float] = (0.03, 0.30)

Array = NDArray[np.float64]


def _rng(seed: int, index: int, part: int) -> np.random.Generator:
    """Independent stream for one part of subject ``index`` of dataset ``seed``."""
    return np.random.default_rng([seed, index, part, 0xF1E1D])


def _grf(rng: np.random.Generator, shape: tuple[int, ...], corr: float, zs: float) -> Array:
    """Zero-mean, unit-std Gaussian random field with correlation length ``corr`` (in-plane pixels)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), (corr * zs, corr, corr), mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _coords(shape: tuple[int, ...], zs: float) -> Array:
    """(3, Z, Y, X) voxel coordinates, z in in-plane pixel units (``zs`` = in-plane / slice spacing)."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    return np.stack([z / zs, y, x])


def _texture(rng: np.random.Generator, xyz: Array, zs: float) -> Array:
    """One texture: band-pass noise, warped stripes or Voronoi cells (zero mean, unit std)."""
    shape = xyz.shape[1:]
    kind = rng.integers(3)
    if kind == 0:
        s1 = rng.uniform(0.7, 1.5)
        s2 = s1 * rng.uniform(2, 3)
        n = rng.standard_normal(shape)
        f = ndimage.gaussian_filter(n, (s1 * zs, s1, s1)) - ndimage.gaussian_filter(n, (s2 * zs, s2, s2))
    elif kind == 1:
        th, tilt = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
        proj = xyz[2] * np.cos(th) + xyz[1] * np.sin(th) + tilt * xyz[0]
        warp = rng.uniform(0.5, 2.0) * _grf(rng, shape, rng.uniform(5, 10), zs)
        f = np.sin(2 * np.pi * proj / rng.uniform(4, 12) + rng.uniform(0, 2 * np.pi) + warp)
    else:
        pts = rng.uniform(0, 1, (int(rng.integers(20, 90)), 3)) * np.array(xyz.max(axis=(1, 2, 3)))
        _, cell = cKDTree(pts).query(xyz.reshape(3, -1).T)
        f = rng.standard_normal(len(pts))[cell].reshape(shape)
    return (f - f.mean()) / (f.std() + 1e-12)


def _lesion_weight(rng: np.random.Generator, xyz: Array, centre: Array, zs: float) -> tuple[Array, Array]:
    """Weight in [0, 1] of one lesion (ellipsoid or thresholded-field blob) and of its core."""
    r = rng.uniform(2.0, 8.0)
    d = xyz - centre[:, None, None, None]
    if rng.random() < 0.5:
        th = rng.uniform(0, np.pi)
        u, v = d[2] * np.cos(th) + d[1] * np.sin(th), -d[2] * np.sin(th) + d[1] * np.cos(th)
        a, b, c = r * rng.uniform(0.6, 1.4, 3)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (d[0] / c) ** 2)
    else:
        rho = np.sqrt((d**2).sum(0)) / r + rng.uniform(0.2, 0.5) * _grf(rng, xyz.shape[1:], rng.uniform(1.5, 3), zs)
    inside, core = (rho < 1).astype(float), (rho < rng.uniform(0.3, 0.6)).astype(float)
    if rng.random() < 0.5:  # soft edge
        inside = ndimage.gaussian_filter(inside, rng.uniform(0.7, 2.0))
    return inside, core * (rng.random() < 0.3)


def rim_keep(index: int, seed: int, brain: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Brain voxels kept by the ragged rim exclusion: those deeper than a rough, random depth."""
    rng = _rng(seed, index, 9)
    depth = np.stack([ndimage.distance_transform_edt(b) for b in brain])
    thresh = rng.uniform(0.5, 1.4) + 0.8 * _grf(rng, brain.shape, rng.uniform(2, 5), 1.0)
    return brain & (depth > thresh)


def _levels(index: int, seed: int, brain: NDArray[np.bool_], zs: float) -> tuple[Array, bool]:
    """True (Z, C, 64, 64) concentrations (inside the brain) and whether lesions were placed."""
    rng = _rng(seed, index, 1)
    shape, xyz = brain.shape, _coords(brain.shape, zs)
    shared = _grf(rng, shape, rng.uniform(3, 10), zs)
    out = np.empty((shape[0], len(METABOLITES)) + shape[1:])
    th = rng.uniform(0, 2 * np.pi)
    step = (xyz[2] - 31.5) * np.cos(th) + (xyz[1] - 31.5) * np.sin(th) > rng.uniform(-15, 15)
    for c, met in enumerate(METABOLITES):
        lo, hi = LEVEL_RANGES[met]
        f = (rng.uniform(0.4, 0.8) * shared + rng.uniform(0.3, 0.6) * _grf(rng, shape, rng.uniform(2, 8), zs)
             + rng.uniform(0.2, 0.6) * _texture(rng, xyz, zs))
        f = (f - f[brain].mean()) / f[brain].std()
        level = np.clip(1 + rng.uniform(0.08, 0.2) * f, 0.3, None)
        if rng.random() < 0.4:  # sharp step across a random plane
            level *= np.where(step, 1 + rng.choice([-1, 1]) * rng.uniform(0.08, 0.2), 1.0)
        mean = rng.uniform(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo))  # median in the brain, before lesions
        out[:, c] = mean * level / np.median(level[brain])
    n_lesions = int(rng.choice(5, p=[0.2, 0.35, 0.25, 0.12, 0.08]))
    deep = np.argwhere(np.stack([ndimage.distance_transform_edt(b) for b in brain]) >= 3)
    for _ in range(n_lesions if len(deep) else 0):
        centre = deep[rng.integers(len(deep))].astype(float) / np.array([zs, 1, 1])
        w, core = _lesion_weight(rng, xyz, centre, zs)
        for c, met in enumerate(METABOLITES):
            out[:, c] *= 1 + (rng.uniform(*LESION_FACTORS[met]) - 1) * w
        out *= (1 - (1 - rng.uniform(0.15, 0.5)) * core)[:, None]
    return out * brain[:, None], n_lesions > 0


def _snr(index: int, seed: int, levels: Array, brain: NDArray[np.bool_], zs: float) -> Array:
    """SNR ~ concentration x coil sensitivity x low-SNR dips, a random 1-21 % of brain voxels below 2.5."""
    rng = _rng(seed, index, 2)
    xyz = _coords(brain.shape, zs)
    n_coils, ring, d0 = int(rng.integers(6, 17)), rng.uniform(38, 48), rng.uniform(15, 30)
    ang = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n_coils) / n_coils
    zc = rng.uniform(0.3, 0.7) * xyz[0].max()
    coil = np.zeros(brain.shape)
    for a in ang:
        pos = np.array([zc, 31.5 + ring * np.sin(a), 31.5 + ring * np.cos(a)])
        coil += (1 + ((xyz - pos[:, None, None, None]) ** 2).sum(0) / d0**2) ** -2
    sens = np.sqrt(coil)
    inside = np.argwhere(brain)
    for _ in range(int(rng.integers(0, 4))):
        p = inside[rng.integers(len(inside))] / np.array([zs, 1, 1])
        d2 = ((xyz - p[:, None, None, None]) ** 2).sum(0)
        sens *= 1 - rng.uniform(0.4, 0.85) * np.exp(-d2 / (2 * rng.uniform(2, 6) ** 2))
    q_subject = rng.uniform(0.02, 0.15)
    snr = np.zeros_like(levels)
    for c in range(levels.shape[1]):
        raw = levels[:, c] * sens * np.exp(0.08 * rng.standard_normal(brain.shape))
        q = np.clip(q_subject * rng.uniform(0.7, 1.4), 0.01, 0.21)
        snr[:, c] = SNR_MIN * raw / max(np.quantile(raw[brain], q), 1e-9) * brain
    return snr


def _fwhm(index: int, seed: int, brain: NDArray[np.bool_], n_met: int, zs: float) -> Array:
    """Linewidth (ppm): smooth field, broader at the brain edge and in a few high-linewidth patches."""
    rng = _rng(seed, index, 3)
    xyz = _coords(brain.shape, zs)
    depth = np.stack([ndimage.distance_transform_edt(b) for b in brain])
    base = rng.uniform(0.045, 0.085) * np.exp(rng.uniform(0.1, 0.25) * _grf(rng, brain.shape, rng.uniform(6, 14), zs))
    base += rng.uniform(0.0, 0.03) * np.exp(-(np.maximum(depth, 1) - 1) / 1.5)
    near_edge = np.argwhere(brain & (depth <= 4))
    inferior = near_edge[near_edge[:, 0] <= np.quantile(near_edge[:, 0], 0.35)] if len(near_edge) else near_edge
    for _ in range(int(rng.integers(1, 5)) if len(near_edge) else 0):
        pool = inferior if rng.random() < 0.5 else near_edge
        p = pool[rng.integers(len(pool))] / np.array([zs, 1, 1])
        d2 = ((xyz - p[:, None, None, None]) ** 2).sum(0)
        base += rng.uniform(0.08, 0.25) * np.exp(-d2 / (2 * rng.uniform(2, 5) ** 2))
    scale = rng.uniform(0.97, 1.08, n_met)[None, :, None, None]
    return np.clip(base[:, None] * scale, *FWHM_RANGE_PPM)


def make_field_subject(index: int, seed: int) -> PhantomSubject:
    """Subject ``index`` of the ``fields`` family drawn with ``seed`` (deterministic)."""
    anat = make_subject(index, seed, tumour_probability=0.0, style="classic")
    brain = anat.brain.astype(bool)
    spacing = np.linalg.norm(np.asarray(anat.mrsi_affine_hr)[:3, :3], axis=0)
    zs = float(spacing[0] / spacing[2])  # in-plane / slice spacing
    levels, has_lesion = _levels(index, seed, brain, zs)
    snr = _snr(index, seed, levels, brain, zs)
    fwhm = _fwhm(index, seed, brain, len(METABOLITES), zs)
    masks = (brain & rim_keep(index, seed, brain))[:, None] & (snr >= SNR_MIN) & (fwhm <= FWHM_MAX_PPM)
    return PhantomSubject(
        subject_id=anat.subject_id, maps=(levels * masks).astype(np.float32), masks=masks,
        snr=snr.astype(np.float32), fwhm=fwhm.astype(np.float32), t1=anat.t1, flair=anat.flair,
        brain=brain, labels=anat.labels, t1_hires=anat.t1_hires, flair_hires=anat.flair_hires,
        anat_affine=anat.anat_affine, mrsi_affine_hr=anat.mrsi_affine_hr, has_tumour=has_lesion,
    )


def generate_field_dataset(n_subjects: int, seed: int) -> list[PhantomSubject]:
    """Subjects ``0 .. n_subjects - 1`` of the ``fields`` family drawn with ``seed``."""
    return [make_field_subject(i, seed) for i in range(n_subjects)]
