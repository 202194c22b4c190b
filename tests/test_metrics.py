"""Metrics (data.metrics) against scikit-image, and the sharpness ratio on built cases."""

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from ftddm_trt.data.metrics import ms_ssim_torch, nrmse, psnr, sharpness, ssim
from ftddm_trt.data.phantom import make_subject


def _pairs():
    rng = np.random.default_rng(0)
    yield rng.random((64, 64)), rng.random((64, 64))
    sub = make_subject(2, seed=0)
    for c in (0, 6):
        truth = sub.maps[sub.n_slices // 2, c].astype(np.float64)
        pred = np.clip(truth + rng.normal(scale=0.1 * truth.max(), size=truth.shape), 0, None)
        yield pred, truth


@pytest.mark.parametrize("k", range(3))
def test_against_skimage(k):
    pred, truth = list(_pairs())[k]
    r = truth.max()
    assert psnr(pred, truth) == pytest.approx(peak_signal_noise_ratio(truth, pred, data_range=r), rel=1e-10)
    assert nrmse(pred, truth) == pytest.approx(normalized_root_mse(truth, pred), rel=1e-10)
    ref = structural_similarity(truth, pred, data_range=r, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim(pred, truth) == pytest.approx(ref, abs=1e-10)


def test_region_and_batch():
    rng = np.random.default_rng(1)
    truth = rng.random((3, 64, 64))
    pred = truth + rng.normal(scale=0.05, size=truth.shape)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 20:40] = True
    t, p = truth[0][mask], pred[0][mask]
    assert nrmse(pred[0], truth[0], mask) == pytest.approx(np.linalg.norm(p - t) / np.linalg.norm(t))
    assert psnr(pred[0], truth[0], mask) == pytest.approx(10 * np.log10(t.max() ** 2 / np.mean((p - t) ** 2)))
    batch = ssim(pred, truth, mask)
    assert batch.shape == (3,)
    for i in range(3):
        assert batch[i] == pytest.approx(ssim(pred[i], truth[i], mask))
    assert ssim(truth, truth, mask) == pytest.approx(np.ones(3))


def test_ms_ssim_torch():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.random((2, 1, 64, 64)), dtype=torch.float64)
    assert float(ms_ssim_torch(x, x)) == pytest.approx(1.0)
    # single scale with the 11-px window is scikit-image's border-cropped SSIM
    y = torch.clamp(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype), 0, 1)
    one = float(ms_ssim_torch(x, y, scales=1, win_size=11))
    ref = np.mean([ssim(y[i, 0].numpy(), x[i, 0].numpy(), data_range=1.0) for i in range(2)])
    assert one == pytest.approx(ref, abs=1e-8)
    # differentiable, monotone in the noise level
    y32 = y.float().requires_grad_(True)
    val = ms_ssim_torch(x.float(), y32)
    val.backward()
    assert torch.isfinite(y32.grad).all() and y32.grad.abs().sum() > 0
    noisier = torch.clamp(x + 0.3 * torch.randn(x.shape, dtype=x.dtype), 0, 1)
    assert float(ms_ssim_torch(x, noisier)) < val.item() < 1.0
    with pytest.raises(ValueError):
        ms_ssim_torch(x[..., :20, :20], x[..., :20, :20])


def _phantom_map():
    """A phantom metabolite map cut by its own support (0 outside), and that region."""
    sub = make_subject(2, seed=0)
    truth = sub.maps[sub.n_slices // 2, 0].astype(np.float64)
    region = truth > 0
    assert region.sum() > 200
    return truth, region


def test_sharpness_orders_blurred_truth_and_noisy():
    truth, region = _phantom_map()
    assert sharpness(truth, truth, region) == 1.0
    soft = ndimage.gaussian_filter(truth, 0.7) * region
    blurred = ndimage.gaussian_filter(truth, 1.5) * region
    noisy = truth + np.random.default_rng(0).normal(scale=0.1 * truth.max(), size=truth.shape) * region
    s_soft, s_blur, s_noisy = (sharpness(x, truth, region) for x in (soft, blurred, noisy))
    assert s_blur < s_soft < 1.0 < s_noisy
    assert s_blur < 0.8 and s_noisy > 1.2
    assert sharpness(2.0 * truth, truth, region) == pytest.approx(2.0)


def test_sharpness_by_hand_and_only_inside_the_region():
    x = np.tile(np.arange(64.0), (64, 1))  # a ramp: gradient magnitude 1 everywhere
    region = np.zeros((64, 64), bool)
    region[10:30, 10:30] = True
    assert sharpness(3.0 * x, x, region) == pytest.approx(3.0)
    # what lies outside the region (the zeros of a masked map, a different mask) changes nothing:
    # only voxels whose right and lower neighbours are in the region count
    assert sharpness(x * region, x, region) == pytest.approx(1.0)
    assert sharpness(x, x * region, region) == pytest.approx(1.0)
    pred = x.copy()
    pred[~region] = 1e6
    assert sharpness(pred, x, region) == pytest.approx(1.0)
    # no mask: the whole image
    assert sharpness(0.5 * x, x) == pytest.approx(0.5)


def test_sharpness_constant_maps_empty_regions_and_batches():
    truth, region = _phantom_map()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings either
        assert sharpness(np.full_like(truth, 3.0), truth, region) == 0.0  # a flat prediction: no detail at all
        flat = np.full((64, 64), 2.0)
        assert sharpness(flat, flat, region) == 1.0  # both flat: as sharp as the truth
        assert np.isnan(sharpness(truth, flat, region))  # a flat truth has no detail to compare with
        assert np.isnan(sharpness(truth, truth, np.zeros((64, 64), bool)))  # empty region
        line = np.zeros((64, 64), bool)
        line[30, 5:40] = True
        assert np.isnan(sharpness(truth, truth, line))  # no voxel with both neighbours in the region
        batch = sharpness(np.stack([truth, ndimage.gaussian_filter(truth, 1.5), flat]),
                          np.stack([truth, truth, flat]), region)
    assert batch.shape == (3,)
    assert batch[0] == 1.0 and batch[1] == pytest.approx(sharpness(ndimage.gaussian_filter(truth, 1.5), truth, region))
    assert batch[2] == 1.0
