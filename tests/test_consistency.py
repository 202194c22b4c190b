"""k-space data consistency against the numpy k-space truncation (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftddm_trt.data.kspace import centred_fft2, kspace_truncate
from ftddm_trt.diffusion.consistency import data_consistency, open_band


@pytest.mark.parametrize("n", [8, 12, 16, 32])
def test_output_reproduces_the_acquisition_and_never_adds_error(n):
    rng = np.random.default_rng(n)
    truth = rng.normal(size=(3, 1, 64, 64))
    estimate = truth + rng.normal(size=truth.shape)
    zf = kspace_truncate(truth, n)[1].astype(np.float64)
    s = torch.full((3,), 64 / n)
    out = data_consistency(torch.from_numpy(estimate), torch.from_numpy(zf), s).numpy()
    band = open_band(n, 64).numpy()
    # on the open band, the output's spectrum is the acquisition's, i.e. the truth's
    np.testing.assert_allclose(centred_fft2(out)[..., band], centred_fft2(truth)[..., band], atol=1e-6 * 64 * 64)
    # outside it, the estimate's spectrum is untouched
    np.testing.assert_allclose(centred_fft2(out)[..., ~band], centred_fft2(estimate)[..., ~band], atol=1e-8 * 64 * 64)
    assert np.linalg.norm(out - truth) < np.linalg.norm(estimate - truth)
    # the truth itself is a fixed point (it is consistent with its own acquisition)
    same = data_consistency(torch.from_numpy(truth), torch.from_numpy(zf), s).numpy()
    np.testing.assert_allclose(same, truth, atol=1e-6)


def test_mixed_scales_in_one_batch_match_one_at_a_time():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(4, 1, 64, 64)).astype(np.float32))
    zf = torch.from_numpy(rng.normal(size=(4, 1, 64, 64)).astype(np.float32))
    s = torch.tensor([8.0, 4.0, 2.0, 4.0])
    both = data_consistency(x, zf, s)
    for i in range(4):
        one = data_consistency(x[i : i + 1], zf[i : i + 1], s[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], one)
    assert both.dtype == torch.float32


def test_open_band_excludes_the_nyquist_lines():
    band = open_band(8, 64)
    assert band.sum() == 7 * 7 and band[32, 32] and not band[28, 32] and band[29, 32]
    with pytest.raises(ValueError):
        open_band(7, 64)


def test_auto_mode_applies_consistency_exactly_for_a_fine_mask(tmp_path):
    from ftddm_trt.data.nifti.read import read_subject
    from ftddm_trt.data.nifti.write import write_phantom_subject
    from ftddm_trt.data.phantom import make_subject
    from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for

    sub = make_subject(0, seed=0)
    coarse = read_subject(write_phantom_subject(tmp_path / "lr", sub, 16))
    fine = read_subject(write_phantom_subject(tmp_path / "hr", sub, 16, hr_masks=True))
    assert (coarse.mask_source, coarse.fine_mask) == ("signal", False)
    assert (fine.mask_source, fine.fine_mask) == ("masks", True)
    spec = SamplerSpec()
    assert consistency_for(spec, "auto", fine.fine_mask).data_consistency
    assert not consistency_for(spec, "auto", coarse.fine_mask).data_consistency
    assert (
        consistency_for(spec, "on", False).data_consistency and not consistency_for(spec, "off", True).data_consistency
    )
    with pytest.raises(ValueError, match="data consistency must be one of"):
        consistency_for(spec, "sometimes", True)


# ------------------------------------------------------------------- partial (qc) data consistency


def _band_matrix(size: int, n: int) -> np.ndarray:
    """B_n as an explicit (size^2, size^2) matrix, brute force from numpy's DFT (independent of torch.fft)."""
    k = np.fft.fftfreq(size) * size  # integer frequencies, numpy order
    keep = np.abs(k) < n // 2
    band = np.outer(keep, keep).reshape(-1).astype(complex)
    f1 = np.exp(-2j * np.pi * np.outer(np.arange(size), np.arange(size)) / size)
    f2 = np.kron(f1, f1)  # 2D DFT on row-major flattened images
    return (np.linalg.inv(f2) @ (band[:, None] * f2)).real


def test_partial_consistency_against_an_explicit_projector():
    from ftddm_trt.diffusion.consistency import partial_consistency

    size, n, w = 16, 8, 0.3
    rng = np.random.default_rng(5)
    x, zf = rng.normal(size=(2, 1, 1, size, size))
    fine = (rng.random((1, 1, size, size)) > 0.3).astype(np.float64)
    b = _band_matrix(size, n)
    expected = x.reshape(-1) + w * b @ (zf.reshape(-1) - (fine * x).reshape(-1))
    got = partial_consistency(torch.from_numpy(x), torch.from_numpy(zf), torch.from_numpy(fine),
                              torch.tensor([size / n]), w)
    np.testing.assert_allclose(got.numpy().reshape(-1), expected, atol=1e-10)


def test_partial_consistency_limits():
    from ftddm_trt.diffusion.consistency import data_consistency, partial_consistency

    rng = np.random.default_rng(6)
    x, zf = (torch.from_numpy(a) for a in rng.normal(size=(2, 3, 1, 64, 64)))
    s = torch.tensor([8.0, 4.0, 2.0])
    ones = torch.ones_like(x)
    torch.testing.assert_close(partial_consistency(x, zf, ones, s, 1.0), data_consistency(x, zf, s))
    torch.testing.assert_close(partial_consistency(x, zf, ones * 0, s, 0.0), x)
    half = partial_consistency(x, zf, ones, s, 0.5)
    torch.testing.assert_close(half, 0.5 * (x + data_consistency(x, zf, s)))  # affine in the weight
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        partial_consistency(x, zf, ones, s, 1.5)
