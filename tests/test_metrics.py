"""Metrics (data.metrics) against scikit-image."""

import numpy as np
import pytest
import torch
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from ftddm_trt.data.metrics import ms_ssim_torch, nrmse, psnr, ssim
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
