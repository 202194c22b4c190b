"""Deterministic synthetic glioma MRSI phantoms built on nilearn's MNI152 (ICBM 2009a) templates.

One subject = a random axial slab of ``Z`` (9..18) slices of 3.44 mm through the cerebrum, seen through
a random rigid + scaling + smooth elastic transform, with:

* 7 metabolite maps (``constants.METABOLITES``, mM-like units) on the 64x64 MRSI grid
  (220 mm FOV), made of tissue fractions (GM, WM, CSF, solid tumour, necrosis, edema) times
  per-subject concentrations drawn in the ranges of ``_GM`` / ``_WM`` / ... below, a per-subject gain, a
  smooth receive (bias) field, mild texture and noise;
* qc maps as FSL-MRS would write them: SNR (signal / noise; low for Gln and Gly) and FWHM in ppm
  (B0 hot spots over the frontal sinus and the temporal bones), plus lipid contamination along the
  brain rim; the quality mask is ``brain & SNR >= 2.5 & FWHM <= 0.15 & ~lipid`` per metabolite and
  the maps are zero outside it (the paper's "quality-filtered" ground truth);
* skull-stripped T1 (tumour dark) and FLAIR (CSF suppressed, edema bright) on a 128x128 grid of the
  same slab (``t1_hires``, ``flair_hires``, world affine ``anat_affine``) and block-averaged onto the
  64x64 grid (``t1``, ``flair``).

World frame (mm): scanner axes, FOV centre at x = y = 0, slab centre at z = 0. On the 64x64 grid
(centred convention of ``data.kspace``) voxel ``(i, j, k)`` sits at ``((i - 32) d, (j - 32) d,
(k - (Z - 1) / 2) d)`` with ``d = 220 / 64``; the 128x128 anatomy grid at ``((i - 64.5) d / 2, ...)``,
so each 64x64 voxel is exactly the 2x2 block ``2i, 2i + 1`` of the anatomy grid.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: the same ``(seed, index)`` gives
identical arrays. About 0.1-0.2 s per subject on one core after the templates are loaded once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ftddm_trt.constants import FOV_MM, FWHM_MAX_PPM, HR_SIZE, METABOLITES, SNR_MIN
from ftddm_trt.data.masks import quality_mask_from_qc
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

#: In-plane matrix of the synthetic T1/FLAIR (same FOV, same slices as the MRSI).
ANAT_SIZE: int = 2 * HR_SIZE

#: Names of the values of ``PhantomSubject.labels`` (dominant tissue of each 64x64 voxel).
LABELS: tuple[str, ...] = ("background", "csf", "gm", "wm", "edema", "solid", "necrosis")

_VOXEL_MM = FOV_MM / HR_SIZE  # 3.4375 mm, isotropic MRSI voxels
_ANAT_MM = FOV_MM / ANAT_SIZE
_MNI_FOV_CENTRE = np.array([0.0, -17.0])  # in-plane centre of the MNI brain (mm)
_CEREBRUM_Z = (-18.0, 66.0)  # MNI z range the slab stays inside (mm)

# Concentration ranges (mM) per tissue, in the range of published in-vivo brain values; order = METABOLITES.
#                        tCr         tCho        NAA          Glu          Ins         Gln         Gly
_GM = np.array([(7.0, 9.0), (1.0, 1.4), (8.0, 11.0), (8.5, 11.0), (4.5, 7.0), (2.5, 4.5), (0.5, 1.1)])
_WM = np.array([(5.0, 6.5), (1.4, 2.0), (7.5, 10.0), (5.5, 7.5), (4.0, 6.0), (1.5, 3.0), (0.3, 0.8)])
_CSF = np.array([(0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.08, 0.12), (0.4, 0.6), (0.0, 0.0)])
# Solid tumour: absolute (mM) except Glu and Ins, which are factors of the local normal level.
_SOLID = np.array([(3.0, 6.0), (2.5, 5.0), (1.5, 4.0), (0.4, 0.8), (0.6, 1.2), (4.0, 8.0), (1.5, 4.0)])
_SOLID_RELATIVE = np.array([False, False, False, True, True, False, False])
_NECROSIS = np.array([(0.5, 2.0), (0.3, 1.0), (0.0, 0.5), (0.0, 1.0), (0.8, 1.2), (0.8, 1.2), (0.4, 0.6)])
_EDEMA = np.array([(0.8, 1.0), (0.9, 1.3), (0.6, 0.9), (0.75, 0.85), (1.0, 1.3), (1.0, 1.6), (1.0, 2.0)])
# SNR per mM of a 64x64 voxel at unit receive sensitivity (singlets high, J-coupled Gln low).
_SNR_PER_MM = np.array([3.0, 9.0, 2.6, 1.5, 1.8, 1.25, 5.0])
_MAP_NOISE = 0.4  # map noise sd as a fraction of signal / SNR (fitting regularizes the maps)

# B0 hot spots in MNI mm: frontal sinus, left and right temporal bone.
_HOTSPOTS = np.array([[0.0, 58.0, -18.0], [-48.0, -14.0, -30.0], [48.0, -14.0, -30.0]])


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


def subject_id_for(index: int) -> str:
    """Subject id of phantom ``index`` (independent of the seed)."""
    return f"sub-{index:03d}"


def subject_index(subject_id: str) -> int:
    """Inverse of :func:`subject_id_for`: ``"sub-007"`` -> 7."""
    prefix = "sub-"
    if not subject_id.startswith(prefix) or not subject_id[len(prefix):].isdigit():
        raise ValueError(f"not a phantom subject id: {subject_id!r} (expected sub-NNN)")
    return int(subject_id[len(prefix):])


def _rotation(yaw: float, pitch: float, roll: float) -> NDArray[np.float64]:
    """Rotation matrix Rz(yaw) @ Rx(pitch) @ Ry(roll), angles in radians."""
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _smooth_fields(
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


def _block_mean(a: NDArray, factor: int = 2) -> NDArray[np.float32]:
    """Mean over ``factor x factor`` in-plane blocks: ``(..., f*H, f*W)`` -> ``(..., H, W)``."""
    h, w = a.shape[-2] // factor, a.shape[-1] // factor
    return a.reshape(a.shape[:-2] + (h, factor, w, factor)).mean(axis=(-3, -1)).astype(np.float32)


def _sigmoid(x: NDArray) -> NDArray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _grid_axes(z_count: int) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """World coordinates (mm) of the 64x64 voxel centres along x (= y) and z, and of the anatomy grid."""
    x64 = (np.arange(HR_SIZE) - HR_SIZE // 2) * _VOXEL_MM
    xa = (np.arange(ANAT_SIZE) - (ANAT_SIZE // 2 + 0.5)) * _ANAT_MM
    z = (np.arange(z_count) - (z_count - 1) / 2.0) * _VOXEL_MM
    return x64, xa, z


def _affines(z_count: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(MRSI 64x64 affine, anatomy 128x128 affine), voxel -> world mm."""
    z0 = -(z_count - 1) / 2.0 * _VOXEL_MM
    mrsi = np.diag([_VOXEL_MM, _VOXEL_MM, _VOXEL_MM, 1.0])
    mrsi[:3, 3] = [-(HR_SIZE // 2) * _VOXEL_MM, -(HR_SIZE // 2) * _VOXEL_MM, z0]
    anat = np.diag([_ANAT_MM, _ANAT_MM, _VOXEL_MM, 1.0])
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
    gw64 = _block_mean(gm + wm)
    brain64 = _block_mean(brain_frac) >= 0.5
    depth = ndimage.distance_transform_edt(
        np.pad(brain64, ((1, 1), (0, 0), (0, 0))), sampling=(_VOXEL_MM, _VOXEL_MM, _VOXEL_MM)
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
    core = _sigmoid((radius - rho) / border)
    if kind == "lgg":
        nec_radius, edema_factor = 0.0, rng.uniform(1.1, 1.4)
    elif kind == "met":
        nec_radius = radius * rng.uniform(0.3, 0.6) if rng.random() < 0.6 else 0.0
        edema_factor = rng.uniform(2.0, 3.5)
    else:
        nec_radius = radius * rng.uniform(0.3, 0.65) if rng.random() < 0.8 else 0.0
        edema_factor = rng.uniform(1.5, 2.4)
    necrosis = _sigmoid((nec_radius - rho) / 0.8) * (nec_radius > 0)
    zone = _sigmoid((radius * edema_factor - rho) / 3.0)
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
    field = _smooth_fields(rng, 1, xa, xa, zw, (12.0, 30.0), n_terms=8)[0]
    line = np.exp(-((field / width) ** 2))
    carve = (gm * line * 0.9).astype(np.float32)
    return (gm - carve).astype(np.float32), wm.astype(np.float32), (csf + carve).astype(np.float32)


# Solid-lesion concentrations of the other lesion kinds (same columns and conventions as _SOLID).
_SOLID_BY_KIND = {
    "hgg": _SOLID,
    "lgg": np.array([(4.0, 7.0), (1.8, 3.0), (3.0, 6.0), (0.6, 0.9), (1.1, 1.6), (2.0, 4.0), (0.8, 2.0)]),
    "met": np.array([(1.0, 3.0), (2.0, 4.0), (0.0, 1.0), (0.2, 0.5), (0.3, 0.8), (1.0, 3.0), (0.5, 2.0)]),
}


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
    gm_t, wm_t, csf_t, mni_affine = _templates()
    rng = np.random.default_rng([seed, index])
    draw = None if style.is_classic else SubjectDraw.draw(style, style_rng(seed, index, style))
    srng = None if style.is_classic else style_rng(seed, index + 10**6, style)
    n_met = len(METABOLITES)

    # --- geometry: world (scanner, mm) -> MNI (mm) -------------------------------------------
    z_count = int(rng.integers(9, 19))
    x64, xa, zw = _grid_axes(z_count)
    scale = rng.uniform(0.9, 1.1) * (1.0 + rng.uniform(-0.04, 0.04, size=3))  # subject / MNI size
    rot = _rotation(*np.deg2rad([rng.uniform(-12, 12), rng.uniform(-6, 6), rng.uniform(-3, 3)]))
    shift_world = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0])
    half = (z_count * _VOXEL_MM / 2.0) / scale[2]
    lo, hi = _CEREBRUM_Z[0] + half, _CEREBRUM_Z[1] - half
    z_centre = rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)
    centre_mni = np.array([_MNI_FOV_CENTRE[0], _MNI_FOV_CENTRE[1], z_centre])
    lin = rot @ np.diag(1.0 / scale)  # world offset -> MNI offset

    # Points of the anatomy grid (Z, 128, 128) in world mm, then in MNI mm (+ elastic warp).
    elastic = _smooth_fields(rng, 3, xa, xa, zw, (60.0, 160.0), n_terms=3) * rng.uniform(1.5, 3.5)
    px = xa[None, :, None] - shift_world[0]
    py = xa[None, None, :] - shift_world[1]
    pz = zw[:, None, None]
    inv_mni = np.linalg.inv(mni_affine)
    # Slice thickness: average tissue over sub-slices spread across the slice profile (partial volume).
    n_sub = 1 if draw is None or draw.slice_mm <= _VOXEL_MM * 1.05 else 3
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
            q64 = np.stack([_block_mean(c) for c in q])  # MNI coordinates of the 64x64 voxels, (3, Z, 64, 64)
    gm, wm, csf = tissue[0], tissue[1], tissue[2]
    if draw is not None and draw.ribbon:
        gm, wm, csf = _ribbon(srng, gm, wm, csf, xa, zw, draw.sulcus_width)
    brain_frac = np.clip(gm + wm + csf, 0.0, 1.0)

    # --- tumour (on the anatomy grid) ----------------------------------------------------------
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

    # --- anatomy (anatomy grid), then 64x64 ------------------------------------------------------
    t1_w = np.array([0.60, 0.92, 0.18, 0.3, 0.42, 0.14])  # GM, WM, CSF, edema loss, solid, necrosis
    fl_w = np.array([0.70, 0.55, 0.06, 1.0, 0.85, 0.40])  # GM, WM, CSF, edema gain, solid, necrosis
    bias_amp, noise_sd_a = 0.06, 0.015
    if draw is not None:
        t1_w, fl_w = t1_w * draw.anat_contrast[0], fl_w * draw.anat_contrast[1]
        bias_amp, noise_sd_a = draw.anat_bias, draw.anat_noise
    bias_a = np.exp(bias_amp * _smooth_fields(rng, 1, xa, xa, zw, (150.0, 300.0))[0])
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

    f_gm, f_wm, f_csf, f_solid, f_nec, f_edema, f_brain = (
        _block_mean(a) for a in (gm, wm, csf, solid, necrosis, edema, brain_frac)
    )
    brain = f_brain >= 0.5
    labels = np.zeros(brain.shape, dtype=np.uint8)
    stack = np.stack([f_csf, f_gm, f_wm, f_edema * (f_gm + f_wm) * 1.5, f_solid, f_nec])
    labels[brain] = (np.argmax(stack, axis=0) + 1)[brain].astype(np.uint8)

    # --- metabolite maps ---------------------------------------------------------------------------
    solid_ranges = _SOLID if draw is None else _SOLID_BY_KIND[draw.tumour_kind]
    c_gm, c_wm, c_csf, c_solid, c_nec, c_ed = (
        rng.uniform(r[:, 0], r[:, 1]) for r in (_GM, _WM, _CSF, solid_ranges, _NECROSIS, _EDEMA)
    )
    if draw is not None:
        c_gm, c_wm, c_csf = c_gm * draw.ratio[0], c_wm * draw.ratio[1], c_csf * draw.ratio[2]
    c_solid = np.where(_SOLID_RELATIVE, c_solid * 0.5 * (c_gm + c_wm), c_solid)
    fields = _smooth_fields(rng, 2 * n_met + 3, x64, x64, zw, (25.0, 90.0))
    texture = 1.0 + 0.06 * fields[:n_met]
    hetero = np.clip(1.0 + 0.18 * fields[n_met : 2 * n_met], 0.5, None)
    fwhm_field, lipid_field, coil_field = fields[2 * n_met :]
    radial = (x64[:, None] ** 2 + x64[None, :] ** 2) / (FOV_MM / 2) ** 2
    coil = np.exp(rng.uniform(0.0, 0.35) * radial[None] + 0.08 * coil_field).astype(np.float32)
    gain = rng.uniform(0.85, 1.15)

    normal = f_gm[:, None] * c_gm[None, :, None, None] + f_wm[:, None] * c_wm[None, :, None, None]
    normal = normal + f_csf[:, None] * c_csf[None, :, None, None]
    edema_factor = 1.0 + (c_ed[None, :, None, None] - 1.0) * f_edema[:, None]
    conc = normal * edema_factor * texture.transpose(1, 0, 2, 3)
    conc = conc + f_solid[:, None] * c_solid[None, :, None, None] * hetero.transpose(1, 0, 2, 3)
    conc = conc + f_nec[:, None] * c_nec[None, :, None, None]
    if draw is not None and draw.psf_px > 0:
        conc = ndimage.gaussian_filter(conc, sigma=(0, 0, draw.psf_px, draw.psf_px), mode="constant")
    conc = conc.astype(np.float32)  # (Z, C, 64, 64) mM

    # --- qc: lipid rim, FWHM, SNR -----------------------------------------------------------------
    depth_px = np.stack([ndimage.distance_transform_edt(b) for b in brain])  # in-plane, pixels
    lipid_thr = 0.4 + 1.6 * _sigmoid(1.5 * lipid_field + rng.uniform(-0.5, 0.5))
    if draw is not None and draw.ragged > 0:  # rim thickness varying on a short wavelength
        lipid_thr = lipid_thr + draw.ragged * np.abs(_smooth_fields(srng, 1, x64, x64, zw, (8.0, 20.0))[0])
    lipid = brain & (depth_px <= lipid_thr)

    fwhm = rng.uniform(0.055, 0.075) + 0.01 * fwhm_field
    for h, (sig_lo, sig_hi, amp_lo, amp_hi) in zip(
        _HOTSPOTS, [(18, 26, 0.08, 0.25), (14, 22, 0.05, 0.2), (14, 22, 0.05, 0.2)]
    ):
        centre = h + rng.uniform(-6, 6, size=3)
        d2 = sum((q64[a] - centre[a]) ** 2 for a in range(3))
        fwhm = fwhm + rng.uniform(amp_lo, amp_hi) * np.exp(-d2 / (2 * rng.uniform(sig_lo, sig_hi) ** 2))
    fwhm = fwhm + 0.03 * lipid
    snr_scale = rng.uniform(0.85, 1.15) * (1.0 if draw is None else draw.snr_scale)
    snr_clean = conc * coil[:, None] * (_SNR_PER_MM * snr_scale)[None, :, None, None]
    snr_clean = snr_clean * np.where(lipid, 0.5, 1.0)[:, None]
    if draw is not None and draw.holes > 0:  # low-SNR holes covering about `holes` of the brain
        hole_field = _smooth_fields(srng, 1, x64, x64, zw, (12.0, 35.0))[0]
        thr = np.quantile(hole_field[brain], 1.0 - draw.holes) if brain.any() else np.inf
        snr_clean = snr_clean * (1.0 - 0.9 * _sigmoid((hole_field - thr) / 0.05))[:, None]
    snr = snr_clean * np.exp(0.08 * rng.standard_normal(size=snr_clean.shape, dtype=np.float32))
    fwhm_m = fwhm[:, None] * (1.0 + 0.02 * rng.standard_normal(size=conc.shape, dtype=np.float32))
    fwhm_m = fwhm_m + 0.015 * rng.standard_normal(size=conc.shape, dtype=np.float32) / np.maximum(snr, 1.0)
    fwhm_m = np.clip(fwhm_m, 0.02, None)

    noise_sd = _MAP_NOISE * gain / (_SNR_PER_MM * snr_scale)  # raw units, uniform in space
    maps = gain * coil[:, None] * conc + noise_sd[None, :, None, None] * rng.standard_normal(
        size=conc.shape, dtype=np.float32
    )
    masks = brain[:, None] & quality_mask_from_qc(snr, fwhm_m, SNR_MIN, FWHM_MAX_PPM) & ~lipid[:, None]
    maps = np.where(masks, np.clip(maps, 0.0, None), 0.0)

    mrsi_affine, anat_affine = _affines(z_count)
    return PhantomSubject(
        subject_id=subject_id_for(index),
        maps=maps.astype(np.float32),
        masks=masks,
        snr=np.where(brain[:, None], snr, 0.0).astype(np.float32),
        fwhm=fwhm_m.astype(np.float32),
        t1=_block_mean(t1_h),
        flair=_block_mean(flair_h),
        brain=brain,
        labels=labels,
        t1_hires=t1_h,
        flair_hires=flair_h,
        anat_affine=anat_affine,
        mrsi_affine_hr=mrsi_affine,
        has_tumour=has_tumour,
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
