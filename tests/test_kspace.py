"""k-space truncation and zero filling (data.kspace)."""

import numpy as np
import pytest

from ftddm_trt.constants import LR_SIZES
from ftddm_trt.data.kspace import kspace_truncate, zero_fill


def _cosines(freqs, size=64):
    """Band-limited image: sum of cosines centred on pixel size/2; freqs in cycles per FOV."""
    m = np.arange(size) - size // 2
    img = np.zeros((size, size))
    for a, (fx, fy, ph) in enumerate(freqs):
        img += (a + 1) * np.cos(2 * np.pi * (fx * m[:, None] + fy * m[None, :]) / size + ph)
    return img, m


@pytest.mark.parametrize("n", LR_SIZES)
def test_mean_preserved_real_float32(n):
    rng = np.random.default_rng(n)
    x = rng.random((2, 3, 64, 64))
    lr, zf = kspace_truncate(x, n)
    assert lr.shape == (2, 3, n, n) and zf.shape == (2, 3, 64, 64)
    assert lr.dtype == np.float32 and zf.dtype == np.float32
    np.testing.assert_allclose(lr.mean(axis=(-2, -1)), x.mean(axis=(-2, -1)), atol=1e-6)
    np.testing.assert_allclose(zf.mean(axis=(-2, -1)), x.mean(axis=(-2, -1)), atol=1e-6)


def test_constant_and_delta_by_hand():
    lr, zf = kspace_truncate(np.full((64, 64), 3.0), 16)
    np.testing.assert_allclose(lr, 3.0, atol=1e-6)
    np.testing.assert_allclose(zf, 3.0, atol=1e-6)
    # A unit delta at the FOV centre has a flat spectrum: the n x n block inverts to a delta of
    # height n^2/64^2 at voxel n/2 (the centre of the acquired grid).
    x = np.zeros((64, 64))
    x[32, 32] = 1.0
    n = 8
    lr, zf = kspace_truncate(x, n)
    expected = np.zeros((n, n))
    expected[n // 2, n // 2] = n * n / 64**2
    np.testing.assert_allclose(lr, expected, atol=1e-7)
    assert zf[32, 32] == pytest.approx(n * n / 64**2, abs=1e-7)
    assert zf.argmax() == 32 * 64 + 32


@pytest.mark.parametrize("n", [8, 10, 16, 22, 32])
def test_band_limited_image_survives(n):
    # all frequencies strictly below n/2: the block holds the whole spectrum
    top = n // 2 - 1
    x, m = _cosines([(0, 0, 0.0), (1, 2, 0.3), (top, 1, 1.1), (2, -top, -0.7)])
    lr, zf = kspace_truncate(x, n)
    np.testing.assert_allclose(zf, x, atol=1e-4)
    # the acquired voxel k samples the image at 64x64 position s * k (centred grid), s may be fractional
    s = 64 / n
    pos = s * (np.arange(n) - n // 2)
    analytic = np.zeros((n, n))
    for a, (fx, fy, ph) in enumerate([(0, 0, 0.0), (1, 2, 0.3), (top, 1, 1.1), (2, -top, -0.7)]):
        analytic += (a + 1) * np.cos(2 * np.pi * (fx * pos[:, None] + fy * pos[None, :]) / 64 + ph)
    np.testing.assert_allclose(lr, analytic, atol=1e-4)


@pytest.mark.parametrize("n", LR_SIZES)
def test_zero_fill_consistent(n):
    x = np.random.default_rng(1).normal(size=(4, 64, 64)).astype(np.float32)
    lr, zf = kspace_truncate(x, n)
    np.testing.assert_allclose(zero_fill(lr), zf, atol=1e-5)
    if 64 % n == 0:  # interpolating: passes through the acquired samples
        s = 64 // n
        np.testing.assert_allclose(zf[:, ::s, ::s], lr, atol=1e-5)


def test_bad_sizes():
    with pytest.raises(ValueError):
        kspace_truncate(np.zeros((64, 64)), 15)
    with pytest.raises(ValueError):
        kspace_truncate(np.zeros((64, 32)), 16)
    with pytest.raises(ValueError):
        zero_fill(np.zeros((16, 16)), size=8)


# ---- normalization of the zero-filled LR (data.normalize) ------------------------------------------

def test_normalize_maps_per_slice_and_metabolite():
    from ftddm_trt.data.normalize import denormalize, normalize_anatomy, normalize_maps

    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, size=(3, 7, 64, 64)).astype(np.float32)
    _, zf = kspace_truncate(x, 16)
    mask = rng.random((3, 7, 64, 64)) > 0.4
    mask[1, 2] = False  # empty mask: whole image
    zf[2, 5] = 0.0  # all zero: floored
    norm, scale = normalize_maps(zf, mask)
    assert norm.shape == zf.shape and scale.shape == (3, 7) and scale.dtype == np.float32
    assert scale[0, 3] == pytest.approx(np.percentile(zf[0, 3][mask[0, 3]], 99), rel=1e-5)
    assert scale[1, 2] == pytest.approx(np.percentile(zf[1, 2], 99), rel=1e-5)
    assert scale[2, 5] == pytest.approx(1e-6)
    np.testing.assert_allclose(denormalize(norm, scale), zf, rtol=1e-5, atol=1e-6)
    # a mask shared by all metabolites broadcasts
    _, s2 = normalize_maps(zf, mask[:, :1])
    assert s2[0, 4] == pytest.approx(np.percentile(zf[0, 4][mask[0, 0]], 99), rel=1e-5)

    vol = rng.random((5, 64, 64)) * 300
    vol[:, :10] = 0
    a = normalize_anatomy(vol)
    assert a.min() >= 0 and a.max() == 1.0
    assert (a == 1.0).mean() == pytest.approx(0.005 * (vol > 0).mean(), abs=2e-3)
    assert (normalize_anatomy(np.zeros((2, 4, 4))) == 0).all()
