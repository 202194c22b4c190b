"""The metabolite maps of a synthetic phantom (``data.phantom``) and their quality, as FSL-MRS reports it.

* concentrations (``concentrations``): 7 maps (``constants.METABOLITES``, mM-like units) on the 64x64 MRSI
  grid (220 mm FOV), made of the tissue fractions (``data.phantom_anatomy.MrsiTissue``: GM, WM, CSF,
  solid tumour, necrosis, edema) times per-subject concentrations drawn in the ranges of ``_GM`` /
  ``_WM`` / ... below, with mild texture and a smooth receive (coil) sensitivity;
* acquisition (``acquire``): qc maps as FSL-MRS would write them, SNR (signal / noise; low for Gln and
  Gly) and FWHM in ppm (B0 hot spots over the frontal sinus and the temporal bones), lipid contamination
  along the brain rim, a per-subject gain and map noise; the quality mask is
  ``brain & SNR >= 2.5 & FWHM <= 0.15 & ~lipid`` per metabolite and the maps are zero outside it (the
  paper's "quality-filtered" ground truth).

Random draws come from the generators the caller passes, in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ftddm_trt.constants import FOV_MM, FWHM_MAX_PPM, METABOLITES, SNR_MIN
from ftddm_trt.data.masks import quality_mask_from_qc
from ftddm_trt.data.phantom_anatomy import MrsiTissue, Tissue, sigmoid, smooth_fields
from ftddm_trt.data.phantom_styles import SubjectDraw

__all__ = ["TrueMaps", "Acquired", "concentrations", "acquire"]

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

# Solid-lesion concentrations of the other lesion kinds (same columns and conventions as _SOLID).
_SOLID_BY_KIND = {
    "hgg": _SOLID,
    "lgg": np.array([(4.0, 7.0), (1.8, 3.0), (3.0, 6.0), (0.6, 0.9), (1.1, 1.6), (2.0, 4.0), (0.8, 2.0)]),
    "met": np.array([(1.0, 3.0), (2.0, 4.0), (0.0, 1.0), (0.2, 0.5), (0.3, 0.8), (1.0, 3.0), (0.5, 2.0)]),
}


@dataclass
class TrueMaps:
    """A subject's metabolite concentrations before acquisition, on the 64x64 MRSI grid.

    Attributes:
        conc: ``(Z, C, 64, 64)`` float32 concentrations (mM) of the ``C = 7`` metabolites.
        coil: ``(Z, 64, 64)`` float32 receive sensitivity (1 at the centre, rising towards the edge).
        gain: the subject's overall scale of the acquired maps.
        fwhm_field, lipid_field: ``(Z, 64, 64)`` float32 smooth unit fields that shape the linewidth and the
            lipid rim (``acquire``).
    """

    conc: NDArray[np.float32]
    coil: NDArray[np.float32]
    gain: float
    fwhm_field: NDArray[np.float32]
    lipid_field: NDArray[np.float32]


@dataclass
class Acquired:
    """What the acquisition reports, ``(Z, C, 64, 64)`` each: ``maps`` (float32, file units, zero outside
    ``masks``), ``masks`` (bool quality masks), ``snr`` (float32, 0 outside the brain), ``fwhm`` (float32, ppm)."""

    maps: NDArray[np.float32]
    masks: NDArray[np.bool_]
    snr: NDArray[np.float32]
    fwhm: NDArray[np.float32]


def concentrations(voxels: MrsiTissue, tissue: Tissue, rng: np.random.Generator,
                   draw: SubjectDraw | None = None) -> TrueMaps:
    """The concentration maps of a slab whose tissue on the MRSI grid is ``voxels`` (``tissue`` gives its
    grid), per-subject levels drawn from ``rng``; a style's ``draw`` scales the GM / WM / CSF levels, picks
    the lesion kind's levels and blurs the maps (point-spread)."""
    n_met = len(METABOLITES)
    x64, zw = tissue.x64, tissue.z
    solid_ranges = _SOLID if draw is None else _SOLID_BY_KIND[draw.tumour_kind]
    c_gm, c_wm, c_csf, c_solid, c_nec, c_ed = (
        rng.uniform(r[:, 0], r[:, 1]) for r in (_GM, _WM, _CSF, solid_ranges, _NECROSIS, _EDEMA)
    )
    if draw is not None:
        c_gm, c_wm, c_csf = c_gm * draw.ratio[0], c_wm * draw.ratio[1], c_csf * draw.ratio[2]
    c_solid = np.where(_SOLID_RELATIVE, c_solid * 0.5 * (c_gm + c_wm), c_solid)
    fields = smooth_fields(rng, 2 * n_met + 3, x64, x64, zw, (25.0, 90.0))
    texture = 1.0 + 0.06 * fields[:n_met]
    hetero = np.clip(1.0 + 0.18 * fields[n_met : 2 * n_met], 0.5, None)
    fwhm_field, lipid_field, coil_field = fields[2 * n_met :]
    radial = (x64[:, None] ** 2 + x64[None, :] ** 2) / (FOV_MM / 2) ** 2
    coil = np.exp(rng.uniform(0.0, 0.35) * radial[None] + 0.08 * coil_field).astype(np.float32)
    gain = rng.uniform(0.85, 1.15)

    normal = voxels.gm[:, None] * c_gm[None, :, None, None] + voxels.wm[:, None] * c_wm[None, :, None, None]
    normal = normal + voxels.csf[:, None] * c_csf[None, :, None, None]
    edema_factor = 1.0 + (c_ed[None, :, None, None] - 1.0) * voxels.edema[:, None]
    conc = normal * edema_factor * texture.transpose(1, 0, 2, 3)
    conc = conc + voxels.solid[:, None] * c_solid[None, :, None, None] * hetero.transpose(1, 0, 2, 3)
    conc = conc + voxels.necrosis[:, None] * c_nec[None, :, None, None]
    if draw is not None and draw.psf_px > 0:
        conc = ndimage.gaussian_filter(conc, sigma=(0, 0, draw.psf_px, draw.psf_px), mode="constant")
    conc = conc.astype(np.float32)  # (Z, C, 64, 64) mM
    return TrueMaps(conc=conc, coil=coil, gain=gain, fwhm_field=fwhm_field, lipid_field=lipid_field)


def acquire(truth: TrueMaps, voxels: MrsiTissue, tissue: Tissue, rng: np.random.Generator,
            draw: SubjectDraw | None = None, srng: np.random.Generator | None = None) -> Acquired:
    """The maps and qc an acquisition of ``truth`` reports: lipid rim, FWHM (B0 hot spots located by
    ``tissue.mni64``), SNR, map noise and the quality masks. A style's ``draw`` (with its generator
    ``srng``) adds ragged rims and low-SNR holes and scales the SNR."""
    brain, x64, zw, q64 = voxels.brain, tissue.x64, tissue.z, tissue.mni64
    conc, coil, gain = truth.conc, truth.coil, truth.gain
    depth_px = np.stack([ndimage.distance_transform_edt(b) for b in brain])  # in-plane, pixels
    lipid_thr = 0.4 + 1.6 * sigmoid(1.5 * truth.lipid_field + rng.uniform(-0.5, 0.5))
    if draw is not None and draw.ragged > 0:  # rim thickness varying on a short wavelength
        lipid_thr = lipid_thr + draw.ragged * np.abs(smooth_fields(srng, 1, x64, x64, zw, (8.0, 20.0))[0])
    lipid = brain & (depth_px <= lipid_thr)

    fwhm = rng.uniform(0.055, 0.075) + 0.01 * truth.fwhm_field
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
        hole_field = smooth_fields(srng, 1, x64, x64, zw, (12.0, 35.0))[0]
        thr = np.quantile(hole_field[brain], 1.0 - draw.holes) if brain.any() else np.inf
        snr_clean = snr_clean * (1.0 - 0.9 * sigmoid((hole_field - thr) / 0.05))[:, None]
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
    return Acquired(maps=maps.astype(np.float32), masks=masks,
                    snr=np.where(brain[:, None], snr, 0.0).astype(np.float32), fwhm=fwhm_m.astype(np.float32))
