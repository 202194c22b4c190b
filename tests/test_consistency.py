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
    from ftddm_trt.data.nifti_io import read_subject, write_phantom_subject
    from ftddm_trt.data.phantom import make_subject
    from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for

    sub = make_subject(0, seed=0)
    coarse = read_subject(write_phantom_subject(tmp_path / "lr", sub, 16))
    fine = read_subject(write_phantom_subject(tmp_path / "hr", sub, 16, hr_masks=True))
    assert (coarse.mask_source, coarse.fine_mask) == ("qc", False)
    assert (fine.mask_source, fine.fine_mask) == ("masks", True)
    spec = SamplerSpec()
    assert consistency_for(spec, "auto", fine.fine_mask).data_consistency
    assert not consistency_for(spec, "auto", coarse.fine_mask).data_consistency
    assert consistency_for(spec, "on", False).data_consistency and not consistency_for(spec, "off", True).data_consistency
    with pytest.raises(ValueError, match="data consistency must be one of"):
        consistency_for(spec, "sometimes", True)
