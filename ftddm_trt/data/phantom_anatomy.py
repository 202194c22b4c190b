"""The anatomy of a synthetic phantom (``data.phantom``): tissue of nilearn's MNI152 (ICBM 2009a) templates,
lesions, and the T1 / FLAIR images of both.

One slab of ``Z`` (9..18) slices of 3.44 mm through the cerebrum, seen through a random rigid + scaling +
smooth elastic transform, sampled as GM / WM / CSF fractions on a 128x128 anatomy grid (``slab_tissue``);
tumours placed in it as solid, necrotic and edematous fractions (``add_lesions``); skull-stripped T1 (tumour
dark) and FLAIR (CSF suppressed, edema bright) drawn from the fractions (``anatomy_images``); and the
fractions block-averaged onto the 64x64 MRSI grid with each voxel's dominant tissue (``mrsi_fractions``).

World frame (mm): scanner axes, FOV centre at x = y = 0, slab centre at z = 0. On the 64x64 grid
(centred convention of ``data.kspace``) voxel ``(i, j, k)`` sits at ``((i - 32) d, (j - 32) d,
(k - (Z - 1) / 2) d)`` with ``d = 220 / 64``; the 128x128 anatomy grid at ``((i - 64.5) d / 2, ...)``,
so each 64x64 voxel is exactly the 2x2 block ``2i, 2i + 1`` of the anatomy grid (``grid_affines``).

Random draws come from the generators the caller passes, in a fixed order, so that a subject depends on
its seed alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ftddm_trt.constants import FOV_MM, HR_SIZE
from ftddm_trt.data.phantom_styles import SubjectDraw

__all__ = ["ANAT_SIZE", "LABELS", "VOXEL_MM", "Fractions", "Tissue", "MrsiTissue", "slab_tissue", "add_lesions",
           "anatomy_images", "mrsi_fractions", "grid_affines", "smooth_fields", "block_mean", "sigmoid"]

#: In-plane matrix of the synthetic T1/FLAIR (same FOV, same slices as the MRSI).
ANAT_SIZE: int = 2 * HR_SIZE

#: Names of the values of ``MrsiTissue.labels`` (dominant tissue of each 64x64 voxel).
LABELS: tuple[str, ...] = ("background", "csf", "gm", "wm", "edema", "solid", "necrosis")

#: Edge of the isotropic MRSI voxels: 3.4375 mm.
VOXEL_MM = FOV_MM / HR_SIZE
_ANAT_MM = FOV_MM / ANAT_SIZE
_MNI_FOV_CENTRE = np.array([0.0, -17.0])  # in-plane centre of the MNI brain (mm)
_CEREBRUM_Z = (-18.0, 66.0)  # MNI z range the slab stays inside (mm)


@dataclass
class Fractions:
    """Tissue fractions of a slab, float32 in ``[0, 1]``: normal tissue ``gm``, ``wm``, ``csf`` (what lesions
    leave of it) and lesion parts ``solid``, ``necrosis``, ``edema`` (zero without a lesion; edema overlaps
    the normal tissue)."""

    gm: NDArray[np.float32]
    wm: NDArray[np.float32]
    csf: NDArray[np.float32]
    solid: NDArray[np.float32]
    necrosis: NDArray[np.float32]
    edema: NDArray[np.float32]


@dataclass
class Tissue(Fractions):
    """A slab's ``Fractions`` on the anatomy grid, each ``(Z, 128, 128)``, and its grids.

    Attributes:
        brain: ``gm + wm + csf`` before any lesion, clipped to ``[0, 1]``.
        x64, xa, z: world coordinates (mm) of the 64x64 voxel centres along x (= y), of the anatomy
            grid's, and of the slices.
        mni64: ``(3, Z, 64, 64)`` MNI coordinates (mm) of the 64x64 voxels.
        has_tumour: whether a lesion was placed.
    """

    brain: NDArray[np.float32]
    x64: NDArray[np.float64]
    xa: NDArray[np.float64]
    z: NDArray[np.float64]
    mni64: NDArray[np.float64]
    has_tumour: bool = False

    @property
    def n_slices(self) -> int:
        """Number of slices ``Z``."""
        return len(self.z)


@dataclass
class MrsiTissue(Fractions):
    """A slab's ``Fractions`` on the 64x64 MRSI grid, each ``(Z, 64, 64)`` (2x2 block means of ``Tissue``'s),
    with ``brain`` (bool, brain fraction >= 0.5) and ``labels`` (uint8, dominant tissue, names in ``LABELS``)."""

    brain: NDArray[np.bool_]
    labels: NDArray[np.uint8]


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.float64]]:
    """(GM, WM, CSF) probability volumes (float32, 1 mm MNI152) and their affine; loaded once."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32))
    # Keep tissue inside the brain mask only, so that the phantom brain is skull-stripped.
    gm = np.clip(gm * mask, 0.0, 1.0)
    wm = np.clip(wm * mask, 0.0, 1.0)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return gm, wm, csf, np.asarray(gm_img.affine, dtype=np.float64)


def _rotation(yaw: float, pitch: float, roll: float) -> NDArray[np.float64]:
    """Rotation matrix Rz(yaw) @ Rx(pitch) @ Ry(roll), angles in radians."""
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def smooth_fields(
    rng: np.random.Generator,
    n_fields: int,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    z: NDArray[np.float64],
    wavelength_mm: tuple[float, float],
    n_terms: int = 6,
) -> NDArray[np.float32]:
    """Smooth random fields on a separable grid, ~unit variance: ``(n_fields, len(z), len(x), len(y))``.

    Each field is a sum of ``n_terms`` plane waves ``cos(f . p + phi)`` with wavelengths in
    ``wavelength_mm`` and random directions; evaluated as outer products (no transcendental per voxel).
    """
    k = n_fields * n_terms
    direction = rng.normal(size=(k, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = 2 * np.pi / rng.uniform(*wavelength_mm, size=k)
    f = direction * freq[:, None]
    amp = np.exp(1j * rng.uniform(0, 2 * np.pi, size=k)) * math.sqrt(2.0 / n_terms)
    ex = np.exp(1j * f[:, 0:1] * x[None, :])
    ey = np.exp(1j * f[:, 1:2] * y[None, :])
    ez = np.exp(1j * f[:, 2:3] * z[None, :]) * amp[:, None]
    ez = ez.reshape(n_fields, n_terms, -1)
    ex = ex.reshape(n_fields, n_terms, -1)
    ey = ey.reshape(n_fields, n_terms, -1)
    a = ez.transpose(0, 2, 1)[:, :, None, :] * ex.transpose(0, 2, 1)[:, None, :, :]  # (f, z, i, k)
    return (a @ ey[:, None]).real.astype(np.float32)  # (f, z, i, k) @ (f, 1, k, j)


def block_mean(a: NDArray, factor: int = 2) -> NDArray[np.float32]:
    """Mean over ``factor x factor`` in-plane blocks: ``(..., f*H, f*W)`` -> ``(..., H, W)``."""
    h, w = a.shape[-2] // factor, a.shape[-1] // factor
    return a.reshape(a.shape[:-2] + (h, factor, w, factor)).mean(axis=(-3, -1)).astype(np.float32)


def sigmoid(x: NDArray) -> NDArray:
    """The logistic function ``1 / (1 + exp(-x))``, elementwise (through tanh: no overflow)."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _grid_axes(z_count: int) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """World coordinates (mm) of the 64x64 voxel centres along x (= y) and z, and of the anatomy grid."""
    x64 = (np.arange(HR_SIZE) - HR_SIZE // 2) * VOXEL_MM
    xa = (np.arange(ANAT_SIZE) - (ANAT_SIZE // 2 + 0.5)) * _ANAT_MM
    z = (np.arange(z_count) - (z_count - 1) / 2.0) * VOXEL_MM
    return x64, xa, z


def grid_affines(z_count: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(MRSI 64x64 affine, anatomy 128x128 affine), voxel -> world mm."""
    z0 = -(z_count - 1) / 2.0 * VOXEL_MM
    mrsi = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    mrsi[:3, 3] = [-(HR_SIZE // 2) * VOXEL_MM, -(HR_SIZE // 2) * VOXEL_MM, z0]
    anat = np.diag([_ANAT_MM, _ANAT_MM, VOXEL_MM, 1.0])
    off = -(ANAT_SIZE // 2 + 0.5) * _ANAT_MM
    anat[:3, 3] = [off, off, z0]
    return mrsi, anat


def _lesion(
    rng: np.random.Generator,
    kind: str,
    radius: float,
    gm: NDArray, wm: NDArray, brain_frac: NDArray,
    x64: NDArray, xa: NDArray, zw: NDArray, pz: NDArray,
) -> tuple[NDArray, NDArray, NDArray] | None:
    """One lesion on the anatomy grid: (core, necrosis, edema extent) fractions before tissue weighting.

    ``kind``: ``hgg`` (solid rim, necrotic centre in 80 %, edema to 1.5-2.4 radii), ``lgg`` (diffuse,
    no necrosis, blurred border, little edema) or ``met`` (small, often necrotic, edema to 2-3.5 radii).
    Returns None when no deep enough white/grey matter position exists.
    """
    z_count = len(zw)
    gw64 = block_mean(gm + wm)
    brain64 = block_mean(brain_frac) >= 0.5
    depth = ndimage.distance_transform_edt(
        np.pad(brain64, ((1, 1), (0, 0), (0, 0))), sampling=(VOXEL_MM, VOXEL_MM, VOXEL_MM)
    )[1:-1]
    slice_ok = np.zeros(z_count, dtype=bool)
    slice_ok[int(z_count * 0.25) : max(int(math.ceil(z_count * 0.75)), int(z_count * 0.25) + 1)] = True
    cand = np.argwhere((gw64 > 0.8) & (depth >= min(radius * 0.6 + 6.0, depth.max() * 0.8)) & slice_ok[:, None, None])
    if len(cand) == 0:
        return None
    kz, ki, kj = cand[rng.integers(len(cand))]
    c = np.array([x64[ki], x64[kj], zw[kz]]) + rng.uniform(-1.5, 1.5, size=3)
    axes = radius * (1.0 + rng.uniform(-0.2, 0.2, size=3))
    trot = _rotation(*rng.uniform(0, 2 * np.pi, size=3))
    d = np.stack(np.broadcast_arrays(xa[None, :, None] - c[0], xa[None, None, :] - c[1], pz - c[2]))  # world mm
    local = np.einsum("ab,bzij->azij", trot.T, d)
    dist = np.sqrt(sum((local[a] / axes[a]) ** 2 for a in range(3))) * radius + 1e-6
    unit = local / np.linalg.norm(local, axis=0, keepdims=True).clip(1e-6)
    lobes = rng.normal(size=(4, 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    wobble = sum(
        rng.uniform(0.05, 0.12) * np.cos(rng.uniform(2, 5) * np.einsum("a,azij->zij", v, unit) + rng.uniform(0, 6.3))
        for v in lobes
    )
    rho = dist / (1.0 + wobble)
    border = 0.8 if kind != "lgg" else 3.0
    core = sigmoid((radius - rho) / border)
    if kind == "lgg":
        nec_radius, edema_factor = 0.0, rng.uniform(1.1, 1.4)
    elif kind == "met":
        nec_radius = radius * rng.uniform(0.3, 0.6) if rng.random() < 0.6 else 0.0
        edema_factor = rng.uniform(2.0, 3.5)
    else:
        nec_radius = radius * rng.uniform(0.3, 0.65) if rng.random() < 0.8 else 0.0
        edema_factor = rng.uniform(1.5, 2.4)
    necrosis = sigmoid((nec_radius - rho) / 0.8) * (nec_radius > 0)
    zone = sigmoid((radius * edema_factor - rho) / 3.0)
    return core, necrosis, zone


def _ribbon(
    rng: np.random.Generator, gm: NDArray, wm: NDArray, csf: NDArray, xa: NDArray, zw: NDArray, width: float
) -> tuple[NDArray, NDArray, NDArray]:
    """Crisp cortical ribbon and sulcal CSF: sharpen tissue fractions, carve CSF lines through grey matter.

    Sulci follow the zero level set of a smooth random field (wavelength 12-30 mm); ``width`` is their
    relative width. Tissue totals are preserved voxel by voxel.
    """
    total = gm + wm + csf
    p = np.stack([gm, wm, csf]) ** 3
    p = p / np.maximum(p.sum(axis=0), 1e-6) * total
    gm, wm, csf = p[0], p[1], p[2]
    field = smooth_fields(rng, 1, xa, xa, zw, (12.0, 30.0), n_terms=8)[0]
    line = np.exp(-((field / width) ** 2))
    carve = (gm * line * 0.9).astype(np.float32)
    return (gm - carve).astype(np.float32), wm.astype(np.float32), (csf + carve).astype(np.float32)


def slab_tissue(rng: np.random.Generator, draw: SubjectDraw | None = None,
                srng: np.random.Generator | None = None) -> Tissue:
    """GM / WM / CSF fractions of a random slab through the cerebrum, on the anatomy grid.

    ``rng``: the subject's generator (slab size and position, transform, elastic warp); ``draw`` and
    ``srng``: a non-classic style's settings and generator (slice thickness, cortical ribbon), else None.
    """
    gm_t, wm_t, csf_t, mni_affine = _templates()
    z_count = int(rng.integers(9, 19))
    x64, xa, zw = _grid_axes(z_count)
    scale = rng.uniform(0.9, 1.1) * (1.0 + rng.uniform(-0.04, 0.04, size=3))  # subject / MNI size
    rot = _rotation(*np.deg2rad([rng.uniform(-12, 12), rng.uniform(-6, 6), rng.uniform(-3, 3)]))
    shift_world = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0])
    half = (z_count * VOXEL_MM / 2.0) / scale[2]
    lo, hi = _CEREBRUM_Z[0] + half, _CEREBRUM_Z[1] - half
    z_centre = rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)
    centre_mni = np.array([_MNI_FOV_CENTRE[0], _MNI_FOV_CENTRE[1], z_centre])
    lin = rot @ np.diag(1.0 / scale)  # world offset -> MNI offset

    # Points of the anatomy grid (Z, 128, 128) in world mm, then in MNI mm (+ elastic warp).
    elastic = smooth_fields(rng, 3, xa, xa, zw, (60.0, 160.0), n_terms=3) * rng.uniform(1.5, 3.5)
    px = xa[None, :, None] - shift_world[0]
    py = xa[None, None, :] - shift_world[1]
    pz = zw[:, None, None]
    inv_mni = np.linalg.inv(mni_affine)
    # Slice thickness: average tissue over sub-slices spread across the slice profile (partial volume).
    n_sub = 1 if draw is None or draw.slice_mm <= VOXEL_MM * 1.05 else 3
    offsets = [0.0] if n_sub == 1 else list(np.linspace(-0.5, 0.5, n_sub + 2)[1:-1] * draw.slice_mm)
    tissue = np.zeros((3,) + (z_count, ANAT_SIZE, ANAT_SIZE), np.float32)
    for dz in offsets:
        q = [
            centre_mni[a] + lin[a, 0] * px + lin[a, 1] * py + lin[a, 2] * (pz + dz) + elastic[a]
            for a in range(3)
        ]
        vox = np.stack(
            [inv_mni[a, 0] * q[0] + inv_mni[a, 1] * q[1] + inv_mni[a, 2] * q[2] + inv_mni[a, 3] for a in range(3)]
        )
        for k, v in enumerate((gm_t, wm_t, csf_t)):
            tissue[k] += ndimage.map_coordinates(v, vox, order=1, mode="constant", cval=0.0, prefilter=False) / len(
                offsets
            )
        if dz == offsets[len(offsets) // 2]:
            q64 = np.stack([block_mean(c) for c in q])  # MNI coordinates of the 64x64 voxels, (3, Z, 64, 64)
    gm, wm, csf = tissue[0], tissue[1], tissue[2]
    if draw is not None and draw.ribbon:
        gm, wm, csf = _ribbon(srng, gm, wm, csf, xa, zw, draw.sulcus_width)
    zeros = np.zeros_like(gm)
    return Tissue(gm=gm, wm=wm, csf=csf, solid=zeros, necrosis=zeros.copy(), edema=zeros.copy(),
                  brain=np.clip(gm + wm + csf, 0.0, 1.0), x64=x64, xa=xa, z=zw, mni64=q64)


def add_lesions(tissue: Tissue, rng: np.random.Generator, draw: SubjectDraw | None = None,
                srng: np.random.Generator | None = None, tumour_probability: float = 0.85) -> Tissue:
    """``tissue`` with tumours placed in it: solid, necrotic and edematous fractions, the normal tissue
    reduced where the solid and necrotic parts displace it.

    The classic generator (``draw`` None) places one high-grade glioma with ``tumour_probability``; a
    style's ``draw`` gives the lesion kind and count (drawn from ``srng``). Returns a new ``Tissue``.
    """
    gm, wm, csf, brain_frac = tissue.gm, tissue.wm, tissue.csf, tissue.brain
    x64, xa, zw = tissue.x64, tissue.xa, tissue.z
    pz = zw[:, None, None]
    solid = np.zeros_like(gm)
    necrosis = np.zeros_like(gm)
    edema = np.zeros_like(gm)
    has_tumour = bool(rng.random() < tumour_probability)
    radius = rng.uniform(8.0, 20.0)
    if draw is None:
        lesions = [_lesion(rng, "hgg", radius, gm, wm, brain_frac, x64, xa, zw, pz)] if has_tumour else []
    else:
        radii = {"hgg": (8.0, 20.0), "lgg": (10.0, 24.0), "met": (4.0, 10.0)}[draw.tumour_kind]
        lesions = [_lesion(srng, draw.tumour_kind, srng.uniform(*radii), gm, wm, brain_frac, x64, xa, zw, pz)
                   for _ in range(draw.tumour_count)]
    lesions = [les for les in lesions if les is not None]
    has_tumour = bool(lesions)
    if has_tumour:
        core = np.max([les[0] for les in lesions], axis=0)
        necrosis = np.max([les[1] for les in lesions], axis=0)
        zone = np.clip(np.max([les[2] for les in lesions], axis=0) - core, 0.0, 1.0)
        solid = np.clip(core - necrosis, 0.0, 1.0)
        affinity = np.clip((wm + 0.4 * gm) / np.maximum(brain_frac, 1e-3), 0.0, 1.0)
        edema = (zone * affinity * (brain_frac > 0.05)).astype(np.float32)
        solid = (solid * brain_frac).astype(np.float32)
        necrosis = (necrosis * brain_frac).astype(np.float32)
        core = solid + necrosis
        keep = np.clip(1.0 - core / np.maximum(brain_frac, 1e-3), 0.0, 1.0)
        gm, wm, csf = gm * keep, wm * keep, csf * keep
    return dataclasses.replace(tissue, gm=gm, wm=wm, csf=csf, solid=solid, necrosis=necrosis, edema=edema,
                               has_tumour=has_tumour)


def anatomy_images(tissue: Tissue, rng: np.random.Generator,
                   draw: SubjectDraw | None = None) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Skull-stripped ``(T1, FLAIR)`` of ``tissue`` on the anatomy grid, ``(Z, 128, 128)`` float32 each
    (arbitrary units, ~[0, 1]): tissue intensities, a smooth bias field and noise; a style's ``draw``
    scales the contrasts, bias, noise, gamma and gain."""
    gm, wm, csf, edema = tissue.gm, tissue.wm, tissue.csf, tissue.edema
    solid, necrosis, brain_frac, xa, zw = tissue.solid, tissue.necrosis, tissue.brain, tissue.xa, tissue.z
    t1_w = np.array([0.60, 0.92, 0.18, 0.3, 0.42, 0.14])  # GM, WM, CSF, edema loss, solid, necrosis
    fl_w = np.array([0.70, 0.55, 0.06, 1.0, 0.85, 0.40])  # GM, WM, CSF, edema gain, solid, necrosis
    bias_amp, noise_sd_a = 0.06, 0.015
    if draw is not None:
        t1_w, fl_w = t1_w * draw.anat_contrast[0], fl_w * draw.anat_contrast[1]
        bias_amp, noise_sd_a = draw.anat_bias, draw.anat_noise
    bias_a = np.exp(bias_amp * smooth_fields(rng, 1, xa, xa, zw, (150.0, 300.0))[0])
    t1_h = (
        (gm * t1_w[0] + wm * t1_w[1] + csf * t1_w[2]) * (1.0 - t1_w[3] * edema) + solid * t1_w[4] + necrosis * t1_w[5]
    )
    flair_h = (gm * fl_w[0] + wm * fl_w[1] + csf * fl_w[2]) * (1.0 - edema) + (gm + wm) * edema * fl_w[3]
    flair_h = flair_h + csf * edema * 0.06 + solid * fl_w[4] + necrosis * fl_w[5]
    inside = brain_frac > 0.02
    noise_a = rng.standard_normal(size=(2,) + gm.shape, dtype=np.float32) * noise_sd_a
    t1_h = np.where(inside, t1_h * bias_a + noise_a[0], 0.0).clip(0.0, None).astype(np.float32)
    flair_h = np.where(inside, flair_h * bias_a + noise_a[1], 0.0).clip(0.0, None).astype(np.float32)
    if draw is not None:
        t1_h = (draw.anat_gain * t1_h ** draw.anat_gamma).astype(np.float32)
        flair_h = (draw.anat_gain * flair_h ** draw.anat_gamma).astype(np.float32)
    return t1_h, flair_h


def mrsi_fractions(tissue: Tissue) -> MrsiTissue:
    """``tissue`` on the 64x64 MRSI grid: 2x2 block means, the brain mask and each voxel's dominant tissue."""
    f_gm, f_wm, f_csf, f_solid, f_nec, f_edema, f_brain = (
        block_mean(a)
        for a in (tissue.gm, tissue.wm, tissue.csf, tissue.solid, tissue.necrosis, tissue.edema, tissue.brain)
    )
    brain = f_brain >= 0.5
    labels = np.zeros(brain.shape, dtype=np.uint8)
    stack = np.stack([f_csf, f_gm, f_wm, f_edema * (f_gm + f_wm) * 1.5, f_solid, f_nec])
    labels[brain] = (np.argmax(stack, axis=0) + 1)[brain].astype(np.uint8)
    return MrsiTissue(gm=f_gm, wm=f_wm, csf=f_csf, solid=f_solid, necrosis=f_nec, edema=f_edema, brain=brain,
                      labels=labels)
