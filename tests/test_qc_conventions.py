"""qc conventions: each against its definition, brute force on small grids."""

from __future__ import annotations

import numpy as np
import pytest

from ftddm_trt.data.qc_conventions import (
    CONVENTIONS,
    HZ_PER_PPM_3T,
    HZ_PER_PPM_7T,
    acquired_qc,
    footprint_min,
    get_convention,
    sample_index,
    site_quality_mask,
)


def _maps(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 10.0, (2, 64, 64)), rng.uniform(0.03, 0.2, (2, 64, 64))


def _block_mean(x: np.ndarray, s: int) -> np.ndarray:
    """Area mean over the footprint [s*k - s/2, s*k + s/2) of coarse voxel k, pixel m covering [m - 1/2, m + 1/2):
    on a grid of half pixels (subpixel j covers [j/2 - 1/2, j/2)) the footprint is 2s whole subpixels from
    j = 2 (s*k - s/2) + 1."""
    x2 = np.repeat(np.repeat(x, 2, axis=-1), 2, axis=-2)
    shifted = np.roll(x2, (s - 1, s - 1), axis=(-2, -1))  # footprint k now starts at subpixel 2 s k
    n = x.shape[-1] // s
    return shifted.reshape(*x.shape[:-2], n, 2 * s, n, 2 * s).mean(axis=(-3, -1))


@pytest.mark.parametrize("n", [8, 16])
def test_mean_conventions_scale_the_area_mean_by_s_to_the_k(n):
    snr, fwhm = _maps()
    s = 64 // n
    for name, k in (("mean-k0", 0), ("ours", 1), ("mean-k2", 2)):
        got, _ = acquired_qc(snr, fwhm, n, get_convention(name))
        np.testing.assert_allclose(got, _block_mean(snr, s) * s**k, rtol=1e-5)


def test_sample_convention_reads_the_centre_pixel_and_min_the_footprint_minimum():
    snr, fwhm = _maps(1)
    n, s = 8, 8
    got_snr, got_fwhm = acquired_qc(snr, fwhm, n, get_convention("sample"))
    centres = np.arange(n) * s
    np.testing.assert_allclose(got_snr, snr[:, centres][:, :, centres], rtol=1e-6)
    np.testing.assert_allclose(got_fwhm, fwhm[:, centres][:, :, centres], rtol=1e-6)
    np.testing.assert_array_equal(sample_index(10, 64), np.floor(6.4 * np.arange(10) + 0.5).astype(int))
    got_min, _ = acquired_qc(snr, fwhm, n, get_convention("min"))
    shifted = np.roll(snr, (s // 2, s // 2), axis=(-2, -1))
    brute = shifted.reshape(2, n, s, n, s).min(axis=(2, 4))
    np.testing.assert_allclose(got_min, brute, rtol=1e-6)
    np.testing.assert_allclose(footprint_min(snr, 8), brute, rtol=1e-6)


def test_linewidth_units_missing_maps_and_site_thresholds():
    snr, fwhm = _maps(2)
    _, ppm = acquired_qc(snr, fwhm, 16, get_convention("ours"))
    _, hz3 = acquired_qc(snr, fwhm, 16, get_convention("hz-3t"))
    np.testing.assert_allclose(hz3, ppm * HZ_PER_PPM_3T, rtol=1e-5)
    _, hz7 = acquired_qc(snr, fwhm, 16, get_convention("sample-hz-7t"))
    c = np.arange(16) * 4
    np.testing.assert_allclose(hz7, fwhm[:, c][:, :, c] * HZ_PER_PPM_7T, rtol=1e-5)
    assert acquired_qc(snr, fwhm, 16, get_convention("missing")) is None
    strict = get_convention("strict-thresholds")
    base = np.ones(snr.shape, bool)
    np.testing.assert_array_equal(site_quality_mask(base, snr, fwhm, strict), (snr >= 4.0) & (fwhm <= 0.1))
    assert len(CONVENTIONS) >= 7
    with pytest.raises(ValueError, match="unknown qc convention"):
        get_convention("lcmodel-ish")
