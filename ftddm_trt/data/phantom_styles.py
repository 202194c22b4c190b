"""Phantom styles: per-subject randomization of the generator, so a network learns MRSI, not one phantom.

A :class:`PhantomStyle` holds the *distributions* that ``data.phantom.make_subject`` draws each subject's
generator settings from. ``classic`` is the base generator (nothing extra is drawn, so its subjects
depend on the seed alone, bit for bit). The other styles randomize, per subject:

* anatomy: a crisp cortical ribbon (tissue fractions sharpened) and sulcal CSF carved along the zero
  level set of a smooth random field inside grey matter; slice thickness (through-plane partial volume,
  several sub-slices averaged) and an in-plane point-spread blur of the metabolite maps;
* concentrations: GM / WM / CSF levels multiplied by log-normal factors (ratios move, WM may exceed GM);
* tumours: kind (``hgg`` necrotic high-grade glioma, ``lgg`` diffuse low-grade, ``met`` small ring
  metastases with large edema), size and count, including none;
* quality: SNR holes (patches of low SNR from a thresholded random field) and ragged borders (a lipid
  rim whose thickness varies on a short wavelength), both through the qc maps so that a coarse
  acquisition sees them too;
* T1 / FLAIR: tissue intensities, gamma, bias-field strength, noise level and global scale.

Each style draws from its own random stream ``default_rng([seed, index, STYLE_SALT, style_id])``, so the
choice of style never perturbs the ``classic`` stream. ``STYLES`` lists them; ``TRAIN_STYLES`` are the
ones the shipped model is trained on and ``HELD_OUT_STYLE`` is kept out of training for the
generalization benchmark (``benchmarks/results/generalization.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["PhantomStyle", "STYLES", "TRAIN_STYLES", "HELD_OUT_STYLE", "get_style", "style_rng", "SubjectDraw"]

STYLE_SALT = 7_919


@dataclass(frozen=True)
class PhantomStyle:
    """Distributions of the per-subject generator settings (ranges are ``(low, high)``, drawn uniformly).

    Attributes:
        name: style name.
        ribbon_probability: chance of a crisp cortical ribbon with sulcal CSF.
        sulcus_width: relative width of the carved sulci (0.05-0.2: thin to wide).
        slice_mm: slice thickness (mm); > 3.44 mm averages several sub-slices (partial volume).
        psf_px: in-plane Gaussian blur (sigma, 64x64 pixels) of the metabolite maps.
        ratio_sd: sd of the log-normal factor on each tissue's concentrations.
        tumour_count: (min, max) number of lesions, inclusive.
        tumour_kinds: lesion kinds to draw from.
        holes: (min, max) fraction of the brain put in low-SNR holes.
        ragged: (min, max) extra lipid-rim thickness variation, pixels.
        anat_gamma: gamma applied to T1 / FLAIR.
        anat_bias: strength of the anatomical bias field (log amplitude).
        anat_noise: noise sd of T1 / FLAIR (fraction of WM intensity).
        anat_contrast_sd: sd of the log-normal factor on each tissue intensity of T1 / FLAIR.
        snr_scale: factor on every metabolite's SNR (noise level of the maps).
    """

    name: str
    ribbon_probability: float = 0.0
    sulcus_width: tuple[float, float] = (0.08, 0.15)
    slice_mm: tuple[float, float] = (3.4375, 3.4375)
    psf_px: tuple[float, float] = (0.0, 0.0)
    ratio_sd: float = 0.0
    tumour_count: tuple[int, int] = (0, 1)
    tumour_kinds: tuple[str, ...] = ("hgg",)
    holes: tuple[float, float] = (0.0, 0.0)
    ragged: tuple[float, float] = (0.0, 0.0)
    anat_gamma: tuple[float, float] = (1.0, 1.0)
    anat_bias: tuple[float, float] = (0.06, 0.06)
    anat_noise: tuple[float, float] = (0.015, 0.015)
    anat_contrast_sd: float = 0.0
    snr_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def is_classic(self) -> bool:
        """True for the base generator (nothing extra drawn per subject)."""
        return self.name == "classic"


@dataclass(frozen=True)
class SubjectDraw:
    """One subject's generator settings, drawn from a :class:`PhantomStyle` (see its attributes)."""

    ribbon: bool
    sulcus_width: float
    slice_mm: float
    psf_px: float
    ratio: NDArray[np.float64]  # (3,) factors on GM, WM, CSF concentrations
    tumour_count: int
    tumour_kind: str
    holes: float
    ragged: float
    anat_gamma: float
    anat_bias: float
    anat_noise: float
    anat_contrast: NDArray[np.float64]  # (2, 6) factors on tissue intensities of T1 and FLAIR
    anat_gain: float
    snr_scale: float

    @classmethod
    def draw(cls, style: PhantomStyle, rng: np.random.Generator) -> "SubjectDraw":
        """One subject's settings drawn from ``style``'s distributions with ``rng`` (the style's stream)."""
        u = lambda r: float(rng.uniform(*r))  # noqa: E731
        lo, hi = style.tumour_count
        return cls(
            ribbon=bool(rng.random() < style.ribbon_probability),
            sulcus_width=u(style.sulcus_width),
            slice_mm=u(style.slice_mm),
            psf_px=u(style.psf_px),
            ratio=np.exp(style.ratio_sd * rng.standard_normal(3)),
            tumour_count=int(rng.integers(lo, hi + 1)),
            tumour_kind=str(style.tumour_kinds[int(rng.integers(len(style.tumour_kinds)))]),
            holes=u(style.holes),
            ragged=u(style.ragged),
            anat_gamma=u(style.anat_gamma),
            anat_bias=u(style.anat_bias),
            anat_noise=u(style.anat_noise),
            anat_contrast=np.exp(style.anat_contrast_sd * rng.standard_normal((2, 6))),
            anat_gain=float(np.exp(rng.uniform(-1.0, 1.0))) if not style.is_classic else 1.0,
            snr_scale=u(style.snr_scale),
        )


STYLES: dict[str, PhantomStyle] = {
    s.name: s
    for s in (
        PhantomStyle("classic"),
        # Crisp cortex with sulci, thin slices, several high-grade lesions or metastases, ragged masks.
        PhantomStyle("ribbon", ribbon_probability=1.0, sulcus_width=(0.06, 0.14), ratio_sd=0.2,
                     tumour_count=(0, 3), tumour_kinds=("hgg", "met"), holes=(0.02, 0.10), ragged=(1.0, 2.5),
                     anat_gamma=(0.7, 1.4), anat_bias=(0.05, 0.25), anat_noise=(0.01, 0.04),
                     anat_contrast_sd=0.15, snr_scale=(0.7, 1.3)),
        # Thick slices and a broad point-spread function, diffuse low-grade lesions, smooth masks.
        PhantomStyle("smooth", ribbon_probability=0.0, slice_mm=(5.0, 10.0), psf_px=(0.6, 1.5), ratio_sd=0.3,
                     tumour_count=(0, 2), tumour_kinds=("lgg",), holes=(0.0, 0.03), ragged=(0.0, 0.5),
                     anat_gamma=(0.8, 1.25), anat_bias=(0.1, 0.35), anat_noise=(0.005, 0.03),
                     anat_contrast_sd=0.25, snr_scale=(0.8, 1.6)),
        # A mixture: sometimes a ribbon, moderate blur, every lesion kind, many small holes, noisy anatomy.
        PhantomStyle("patchy", ribbon_probability=0.5, sulcus_width=(0.1, 0.2), slice_mm=(3.4375, 6.0),
                     psf_px=(0.0, 1.0), ratio_sd=0.35, tumour_count=(0, 3), tumour_kinds=("hgg", "lgg", "met"),
                     holes=(0.05, 0.18), ragged=(0.5, 2.0), anat_gamma=(0.6, 1.6), anat_bias=(0.05, 0.4),
                     anat_noise=(0.01, 0.06), anat_contrast_sd=0.3, snr_scale=(0.6, 1.4)),
    )
}

#: Styles the shipped model is trained on, and the style kept out for the generalization benchmark.
TRAIN_STYLES: tuple[str, ...] = ("classic", "smooth", "patchy")
HELD_OUT_STYLE: str = "ribbon"


def get_style(name: str) -> PhantomStyle:
    """The style called ``name`` (a clear error naming the known ones otherwise)."""
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(f"unknown phantom style {name!r}; known styles: {', '.join(STYLES)}") from None


def style_rng(seed: int, index: int, style: PhantomStyle) -> np.random.Generator:
    """The style's own random stream for subject ``index`` (independent of the classic stream)."""
    return np.random.default_rng([seed, index, STYLE_SALT, list(STYLES).index(style.name)])
