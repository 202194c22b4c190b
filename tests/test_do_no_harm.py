"""Do no harm: a run-time correction is kept, per map, only where it agrees better with the acquired band."""

from __future__ import annotations

import numpy as np
import torch

from ftddm_trt.data.kspace import kspace_truncate
from ftddm_trt.diffusion.consistency import band_residual, keep_if_closer
from ftddm_trt.engine.pipeline import qc_consistency


def _band_residual_numpy(x: np.ndarray, zf: np.ndarray, n: int) -> float:
    """||B_n (x - zf)|| by brute force: centred FFT, keep |k| < n/2 on both axes, Parseval."""
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x - zf)))
    f = np.arange(64) - 32
    band = (np.abs(f) < n // 2)[:, None] & (np.abs(f) < n // 2)[None, :]
    return float(np.sqrt((np.abs(k[band]) ** 2).sum() / 64**2))


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.zeros((64, 64))
    truth[16:48, 12:52] = rng.uniform(0.5, 1.0)
    truth[20:28, 20:36] = 0.0  # a hole the acquisition saw as zeros
    _, zf = kspace_truncate(truth, 16)
    return truth, zf


def test_band_residual_against_brute_force():
    truth, zf = _case()
    x = truth + np.random.default_rng(1).normal(0, 0.1, truth.shape)
    got = band_residual(torch.from_numpy(x)[None, None], torch.from_numpy(zf)[None, None], torch.tensor([4.0]))
    assert abs(float(got[0]) - _band_residual_numpy(x, zf, 16)) < 1e-9


def test_a_correction_that_agrees_less_with_the_acquisition_is_refused():
    truth, zf = _case()
    good = torch.from_numpy(truth)[None, None]
    bad = good + 0.3  # agrees less with the acquired band
    zf_t, s = torch.from_numpy(zf)[None, None], torch.tensor([4.0])
    out, applied = keep_if_closer(good, bad, zf_t, s)
    assert not bool(applied[0]) and torch.equal(out, good)
    out, applied = keep_if_closer(bad, good, zf_t, s)
    assert bool(applied[0]) and torch.equal(out, good)


def test_qc_step_through_a_wrong_fine_mask_is_refused_and_through_the_right_one_kept():
    """Built case: the output is 10 % low over the acquired region and zero elsewhere in a wider M. Through
    the true fine mask the qc step restores the acquired band and is kept; through a mask that drops almost
    everything (a qc convention read wrongly) it would add the acquisition on top of the output: refused."""
    truth, zf = _case()
    fine = (truth > 0).astype(np.float64)
    support = np.zeros((64, 64))
    support[8:56, 4:60] = 1.0
    x = 0.9 * truth
    y = torch.from_numpy(np.stack([zf, support, support, support]))[None].float()
    xt = torch.from_numpy(x)[None, None].float()
    s = torch.tensor([4.0])
    wrong = torch.zeros(1, 1, 64, 64)
    wrong[..., 30:32, 30:32] = 1.0
    masks = torch.cat([torch.from_numpy(fine)[None, None].float(), wrong])
    out, applied = qc_consistency(xt.repeat(2, 1, 1, 1), y.repeat(2, 1, 1, 1), s.repeat(2), masks, 1.0)
    assert applied.tolist() == [True, False]
    assert torch.equal(out[1], xt[0])
    region = fine > 0
    err = lambda a: float(np.sqrt(((a - truth)[region] ** 2).mean()))  # noqa: E731
    assert err(out[0, 0].double().numpy()) < 0.5 * err(x)


def test_a_further_solver_pass_never_agrees_less_with_the_acquired_band(tiny_model_dir):
    """sample_batch keeps pass k + 1 of ftddm-dpmpp per image only where it agrees at least as well."""
    from dataclasses import replace

    from ftddm_trt.diffusion.consistency import band_residual
    from ftddm_trt.engine.pipeline import SamplerSpec, sample_batch
    from ftddm_trt.engine.torch_backend import TorchBackend
    from ftddm_trt.models.model_set import ModelSet

    backend = TorchBackend(ModelSet.open(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4, 4, 64, 64, generator=g)
    y[:, 1] = (y[:, 1] < 0.7).float()
    y[:, 0] *= y[:, 1]
    s = torch.tensor([2.0, 4.0, 8.0, 4.0])
    spec = SamplerSpec(ttrunc=20, steps=2, tau_f=0.0, data_consistency=False, passes=3)
    passes: list[torch.Tensor] = []
    out = sample_batch(backend, spec, y, s, torch.Generator().manual_seed(1), on_pass=passes.append)
    assert len(passes) == 3 and torch.equal(passes[-1], out.x0)
    res = [band_residual(p, y[:, 0:1], s) for p in passes]
    assert bool((res[1] <= res[0]).all()) and bool((res[2] <= res[1]).all())
    one = sample_batch(backend, replace(spec, passes=1), y, s, torch.Generator().manual_seed(1))
    assert torch.equal(one.x0, passes[0])
