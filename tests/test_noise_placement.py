"""Sampler noise is drawn where the generator lives and then moved to the backend's device.

torch refuses ``torch.randn(..., generator=<cpu generator>, device="cuda")``. These tests run the
samplers on a simulated foreign device (``meta``) under a ``torch.randn`` that is as strict as CUDA's,
check that the CPU generator advances exactly as in a CPU run (so one seed gives the same noise on every
backend), that CPU outputs are unchanged, and, on a CUDA machine only, that CUDA matches the CPU.
"""

from __future__ import annotations

import pytest
import torch

from ftddm_trt.diffusion import (
    CosineSchedule,
    ancestral_sample,
    draw_ancestral_noise,
    initial_noise,
    randn_on,
    truncated_timesteps,
)
from ftddm_trt.diffusion.consistency import data_consistency
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, sample_batch, sample_images

_real_randn = torch.randn


def _strict_randn(*args, generator=None, device=None, **kwargs):
    """``torch.randn`` that, like CUDA, refuses a generator of another device than the draw's."""
    if generator is not None:
        where = torch.device(device) if device is not None else torch.device("cpu")
        if where.type != generator.device.type:
            raise RuntimeError(
                f"Expected a '{where.type}' device type for generator but found '{generator.device.type}'"
            )
    return _real_randn(*args, generator=generator, device=device, **kwargs)


@pytest.fixture
def strict_randn(monkeypatch):
    monkeypatch.setattr(torch, "randn", _strict_randn)


class MetaBackend(Backend):
    """A backend on a device that is not the generator's (``meta``: shapes only, no data)."""

    name = "meta"
    device = torch.device("meta")

    def unet(self, x_t, y, t, s, full=False):
        assert x_t.device.type == "meta" and y.device.type == "meta"
        return 0.1 * x_t

    def flow_reverse(self, eps, y, tau_f):
        assert eps.device.type == "meta"
        return 0.5 * eps + y[:, :1]


class CpuBackend(MetaBackend):
    name = "cpu-stub"
    device = torch.device("cpu")

    def unet(self, x_t, y, t, s, full=False):
        return 0.1 * x_t

    def flow_reverse(self, eps, y, tau_f):
        return 0.5 * eps + y[:, :1]


def _next_value(gen: torch.Generator) -> float:
    return float(_real_randn(1, generator=gen))


def test_the_strict_randn_refuses_what_cuda_refuses(strict_randn):
    with pytest.raises(RuntimeError, match="generator"):
        torch.randn(2, generator=torch.Generator(), device="meta")


def test_randn_on_draws_on_the_generator_device_then_moves(strict_randn):
    g_meta, g_cpu = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = randn_on(g_meta, (3, 1, 4, 4), "meta", torch.float16)
    assert z.device.type == "meta" and z.dtype == torch.float16 and z.shape == (3, 1, 4, 4)
    _real_randn((3, 1, 4, 4), generator=g_cpu)
    assert _next_value(g_meta) == _next_value(g_cpu)  # the CPU generator advanced by exactly one draw


def test_randn_on_cpu_is_the_plain_draw_and_reduced_precision_is_its_cast():
    ref = _real_randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(randn_on(torch.Generator().manual_seed(3), (2, 1, 8, 8), "cpu"), ref)
    bf = randn_on(torch.Generator().manual_seed(3), (2, 1, 8, 8), "cpu", torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, ref.to(torch.bfloat16))
    f64 = randn_on(torch.Generator().manual_seed(3), (4,), "cpu", torch.float64)
    assert torch.equal(f64, _real_randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))


def test_ancestral_and_initial_noise_on_a_foreign_device(strict_randn):
    mask = torch.ones(2, 1, 8, 8, device="meta")
    g = torch.Generator().manual_seed(0)
    x_start = initial_noise(mask, g)
    assert x_start.device.type == "meta"
    res = ancestral_sample(
        lambda x, t: 0.1 * x, x_start, mask, CosineSchedule(1000), truncated_timesteps(6), generator=g
    )
    assert res.x0.device.type == "meta" and res.nfe == 6
    assert draw_ancestral_noise(4, x_start, g).device.type == "meta"
    g_ref = torch.Generator().manual_seed(0)
    for _ in range(1 + 5 + 3):  # initial noise, 5 chain draws, 3 noise draws
        _real_randn((2, 1, 8, 8), generator=g_ref)
    assert _next_value(g) == _next_value(g_ref)


# data consistency off: it reads the per-image scale s on the CPU, and meta tensors hold no values
@pytest.mark.parametrize("spec", [SamplerSpec("ftddm", ttrunc=7, data_consistency=False),
                                  SamplerSpec("ddpm-respaced", steps=6, data_consistency=False),
                                  SamplerSpec("ddpm", data_consistency=False),
                                  SamplerSpec("ftddm-dpmpp", ttrunc=10, steps=3, data_consistency=False)],
                         ids=lambda s: s.name)
def test_every_stochastic_sampler_runs_on_a_foreign_device_with_the_cpu_noise_sequence(strict_randn, spec):
    y = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    s = torch.full((2,), 4.0)
    g_meta, g_cpu = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    res = sample_batch(MetaBackend(), spec, y, s, g_meta)
    assert res.x0.device.type == "meta" and res.x0.shape == (2, 1, 16, 16) and res.nfe == spec.nfe
    ref = sample_batch(CpuBackend(), spec, y, s, g_cpu)
    assert ref.x0.device.type == "cpu"
    assert _next_value(g_meta) == _next_value(g_cpu)  # same number of draws in the same order


def test_cpu_outputs_are_unchanged_by_the_placement():
    """sample_batch on the CPU equals the chain computed with noise drawn the old way (torch.randn on the CPU),
    followed by the k-space data consistency step (on by default)."""
    y = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    y[:, 1] = (y[:, 1] > 0.3).float()
    s = torch.full((3,), 4.0)
    spec = SamplerSpec("ftddm", ttrunc=8, clip_x0=None)
    got = sample_batch(CpuBackend(), spec, y, s, torch.Generator().manual_seed(4)).x0
    g = torch.Generator().manual_seed(4)
    mask = y[:, 1:2]
    x_start = (0.5 * _real_randn((3, 1, 16, 16), generator=g) + y[:, :1]) * mask
    noise = torch.stack([_real_randn((3, 1, 16, 16), generator=g) for _ in range(7)])
    want = ancestral_sample(lambda x, t: 0.1 * x, x_start, mask, CosineSchedule(1000), truncated_timesteps(8),
                            tau_d=spec.tau_d, noise=noise).x0
    assert spec.data_consistency
    want = data_consistency(want, y[:, :1], s) * mask
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("spec", [SamplerSpec("ftddm", ttrunc=10), SamplerSpec("ddpm-respaced", steps=8),
                                  SamplerSpec("ftddm-dpmpp", ttrunc=10, steps=4)], ids=lambda s: s.name)
def test_cuda_and_cpu_give_the_same_output_for_a_seed(tiny_model_dir, spec):
    from ftddm_trt.engine.torch_backend import TorchBackend
    from ftddm_trt.models.model_set import ModelSet

    y = torch.rand(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    y[:, 1] = (y[:, 1] > 0.2).float()
    s = torch.full((4,), 4.0)
    models = ModelSet.open(tiny_model_dir)
    cpu, _ = sample_images(TorchBackend(models), spec, y, s, batch_size=2, seed=1)
    gpu, _ = sample_images(TorchBackend(models, device="cuda"), spec, y, s, batch_size=2, seed=1)
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)
