"""Ways qc maps of an ``n x n`` acquisition are written, and what each makes of a 64x64 subject.

Fitting tools and pipelines do not agree on what the SNR and linewidth of a coarse voxel are. Given the
64x64 SNR map (signal amplitude in units of a 64x64 voxel's noise SD) and FWHM map (ppm) of a subject,
a :class:`QcConvention` says how its ``n x n`` qc maps come out (``s = 64 / n``):

* ``snr_rule = "mean"``: the area mean of the 64x64 SNR over the coarse voxel's footprint, times
  ``s ** snr_exponent`` (0: SNR per unit volume, as if computed on the fine grid and averaged;
  1: fewer phase encodes, the noise of k-space truncation; 2: a time-matched scan whose SNR grows with
  voxel volume). ``"sample"``: the value at one point, the fine voxel at the coarse voxel's centre (qc
  computed on a finer grid and resampled by nearest neighbour), times ``s ** snr_exponent``.
  ``"min"``: the minimum over the fine voxels whose centres lie in the footprint, times
  ``s ** snr_exponent``.
* ``fwhm_rule = "mean"``: signal-weighted area mean (:func:`data.masks.lr_qc_maps`); ``"sample"``: the
  value at the centre point. ``fwhm_hz_per_ppm``: ``None`` for ppm, else the linewidth is written in Hz
  (127.7 Hz per ppm at 3 T, 297.2 at 7 T).
* ``missing``: the site writes no qc maps at all.
* ``snr_min`` / ``fwhm_max``: the thresholds of the site's own 64x64 quality mask (the paper's 2.5 and
  0.15 ppm, or others); they decide which voxels a site's truth keeps and scores.

``ours`` is the convention the shipped networks were first built on (area mean, exponent 1, ppm).
Nothing at run time assumes any one of them: ``upscale`` derives its mask M from the acquired map itself
(:func:`data.masks.lr_support_mask`), and every correction is checked against the acquisition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ftddm_trt.constants import FWHM_MAX_PPM, SNR_MIN
from ftddm_trt.data.masks import lr_qc_maps, quality_mask_from_qc

__all__ = [
    "with_site_thresholds",
    "QcConvention",
    "CONVENTIONS",
    "BENCHMARK_CONVENTIONS",
    "get_convention",
    "acquired_qc",
    "sample_index",
    "footprint_min",
    "site_quality_mask",
    "HZ_PER_PPM_3T",
    "HZ_PER_PPM_7T",
]

HZ_PER_PPM_3T: float = 127.7
HZ_PER_PPM_7T: float = 297.2
SNR_RULES = ("mean", "sample", "min")
FWHM_RULES = ("mean", "sample")


@dataclass(frozen=True)
class QcConvention:
    """How a site writes the qc maps of an ``n x n`` acquisition (module docstring)."""

    name: str
    snr_rule: str = "mean"
    snr_exponent: float = 1.0
    fwhm_rule: str = "mean"
    fwhm_hz_per_ppm: float | None = None
    missing: bool = False
    snr_min: float = SNR_MIN
    fwhm_max: float = FWHM_MAX_PPM

    def __post_init__(self) -> None:
        if self.snr_rule not in SNR_RULES:
            raise ValueError(f"snr_rule must be one of {SNR_RULES}, got {self.snr_rule!r}")
        if self.fwhm_rule not in FWHM_RULES:
            raise ValueError(f"fwhm_rule must be one of {FWHM_RULES}, got {self.fwhm_rule!r}")

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


#: Every convention the robustness benchmark and ``finetune``'s pair generator draw from.
CONVENTIONS: dict[str, QcConvention] = {
    c.name: c
    for c in (
        QcConvention("ours"),
        QcConvention("mean-k0", snr_exponent=0.0),
        QcConvention("mean-k2", snr_exponent=2.0),
        QcConvention("sample", snr_rule="sample", snr_exponent=0.0, fwhm_rule="sample"),
        QcConvention("min", snr_rule="min", snr_exponent=0.0),
        QcConvention("hz-3t", fwhm_hz_per_ppm=HZ_PER_PPM_3T),
        QcConvention(
            "sample-hz-7t", snr_rule="sample", snr_exponent=1.0, fwhm_rule="sample", fwhm_hz_per_ppm=HZ_PER_PPM_7T
        ),
        QcConvention("strict-thresholds", snr_exponent=0.0, snr_min=4.0, fwhm_max=0.1),
        QcConvention("missing", missing=True),
    )
}

#: The benchmark's axis (``benchmarks/robustness.py``): every convention above.
BENCHMARK_CONVENTIONS: tuple[str, ...] = tuple(CONVENTIONS)


def get_convention(name: str) -> QcConvention:
    """The convention called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown qc convention {name!r}; known: {', '.join(CONVENTIONS)}") from None


def sample_index(n: int, size: int) -> NDArray[np.intp]:
    """The fine pixel at the centre of each of ``n`` coarse voxels: ``floor(s * k + 1/2) mod size``."""
    s = size / n
    return (np.floor(s * np.arange(n) + 0.5).astype(np.intp)) % size


def footprint_min(x: ArrayLike, n: int) -> NDArray[np.float64]:
    """Minimum of ``(..., size, size)`` over the fine pixels whose centres lie in each coarse footprint
    ``[s*k - s/2, s*k + s/2)`` (wrapping like the FFT grid) -> ``(..., n, n)``."""
    x = np.asarray(x, dtype=np.float64)
    size = x.shape[-1]
    s = size / n
    m = np.arange(size)
    out = np.empty(x.shape[:-2] + (n, n))
    rows = []
    for k in range(n):
        d = (m - s * k + size / 2) % size - size / 2  # signed distance, wrapped
        rows.append(np.flatnonzero((d >= -s / 2) & (d < s / 2)))
    for a, ia in enumerate(rows):
        for b, ib in enumerate(rows):
            out[..., a, b] = x[..., ia[:, None], ib[None, :]].min(axis=(-2, -1))
    return out


def acquired_qc(snr: ArrayLike, fwhm: ArrayLike, n: int, convention: QcConvention
                ) -> tuple[NDArray[np.float32], NDArray[np.float32]] | None:
    """The ``(snr_nn, fwhm_nn)`` qc maps a site with ``convention`` writes for an ``n x n`` acquisition.

    Args:
        snr, fwhm: ``(..., 64, 64)`` fine SNR and FWHM (ppm) maps.
        n: acquired matrix size.
        convention: the site's convention.

    Returns:
        ``(..., n, n)`` float32 pair (FWHM in the convention's unit), or None when it writes none.
    """
    if convention.missing:
        return None
    snr = np.clip(np.asarray(snr, dtype=np.float64), 0.0, None)
    fwhm = np.asarray(fwhm, dtype=np.float64)
    size = snr.shape[-1]
    s = size / n
    snr_mean, fwhm_mean = lr_qc_maps((snr, fwhm), n, snr_exponent=0.0)
    idx = sample_index(n, size)
    if convention.snr_rule == "mean":
        snr_nn = np.asarray(snr_mean, np.float64)
    elif convention.snr_rule == "sample":
        snr_nn = snr[..., idx[:, None], idx[None, :]]
    else:
        snr_nn = footprint_min(snr, n)
    snr_nn = snr_nn * s**convention.snr_exponent
    fwhm_nn = fwhm_mean if convention.fwhm_rule == "mean" else fwhm[..., idx[:, None], idx[None, :]]
    if convention.fwhm_hz_per_ppm is not None:
        fwhm_nn = np.asarray(fwhm_nn, np.float64) * convention.fwhm_hz_per_ppm
    return snr_nn.astype(np.float32), np.asarray(fwhm_nn, np.float32)


def site_quality_mask(mask: ArrayLike, snr: ArrayLike, fwhm: ArrayLike, convention: QcConvention) -> NDArray[np.bool_]:
    """A subject's 64x64 quality ``mask`` (paper thresholds, brain, lipid) narrowed to the site's own
    thresholds when they are stricter (FWHM in ppm); all ``(..., 64, 64)``."""
    return np.asarray(mask, bool) & quality_mask_from_qc(snr, fwhm, convention.snr_min, convention.fwhm_max)



_S = TypeVar("_S")


def with_site_thresholds(subject: _S, convention: QcConvention) -> _S:
    """A phantom subject (``maps``, ``masks``, ``snr``, ``fwhm`` of shape ``(Z, C, 64, 64)``) whose quality
    masks, and maps cut by them, follow the site's own thresholds (:func:`site_quality_mask`)."""
    masks = site_quality_mask(subject.masks, subject.snr, subject.fwhm, convention)
    return replace(subject, masks=masks, maps=(subject.maps * masks).astype(np.float32))
