"""The sampling pipeline: sampler specs and their NFE, backend parity (PyTorch vs ONNX Runtime),
batching, the mask, reduced precision, and backend construction."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from ftddm_trt.data.nifti.read import read_subject
from ftddm_trt.engine import factory
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.engine.pipeline import SAMPLERS, SamplerSpec, sample_batch, sample_images
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.engine.upscale import build_condition
from ftddm_trt.models.model_set import ModelSet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

#: fp32 PyTorch vs fp32 ONNX Runtime after a short chain: per-call differences (~1e-6, summation
#: order) grow a little through the solver steps; outputs are O(1) (normalized units).
BACKEND_ATOL = 1e-3


class CountingBackend(Backend):
    """Wraps a backend and counts its network calls (and the images they carried)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.device = inner.device
        self.calls: Counter[str] = Counter()
        self.images: Counter[str] = Counter()

    def unet(self, x_t, y, t, s, full=False):
        name = "unet_full" if full else "unet"
        assert x_t.shape[0] == y.shape[0] == t.shape[0] == s.shape[0]
        assert t.dtype == torch.float32 and float(t.min()) >= 1
        self.calls[name] += 1
        self.images[name] += x_t.shape[0]
        return self.inner.unet(x_t, y, t, s, full=full)

    def flow_reverse(self, eps, y, tau_f):
        self.calls["flow"] += 1
        self.images["flow"] += eps.shape[0]
        return self.inner.flow_reverse(eps, y, tau_f)

    def munet(self, y, s):
        self.calls["munet"] += 1
        self.images["munet"] += y.shape[0]
        return self.inner.munet(y, s)

    def enhancer_reverse(self, eps, y, x_munet, tau_f):
        self.calls["flow_enhancer"] += 1
        self.images["flow_enhancer"] += eps.shape[0]
        return self.inner.enhancer_reverse(eps, y, x_munet, tau_f)


class StubBackend(Backend):
    """No networks: outputs that are non-zero everywhere (also outside the mask), for cheap counting."""

    name = "stub"

    def unet(self, x_t, y, t, s, full=False):
        return 0.1 * x_t + 0.3 + 0.01 * y[:, :1]

    def flow_reverse(self, eps, y, tau_f):
        return 0.5 + 0.2 * eps + y[:, :1]

    def munet(self, y, s):
        return 0.4 + 0.1 * y[:, :1] + 0.0 * s.view(-1, 1, 1, 1)

    def enhancer_reverse(self, eps, y, x_munet, tau_f):
        return x_munet + 0.1 * tau_f.view(-1, 1, 1, 1) * eps


def _inputs(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(k, 4, 64, 64, generator=g)
    y[:, 1] = 0.0
    y[:, 1, 12:52, 10:50] = 1.0  # mask M: a box, different per image
    for i in range(k):
        y[i, 1, :, : 10 + 3 * i] = 0.0
    y[:, 0] *= y[:, 1]
    s = torch.tensor([4.0, 2.0, 8.0, 3.2, 16 / 3, 4.0, 2.0, 8.0][:k])
    return y, s


@pytest.fixture(scope="module")
def real_condition(phantom_subject_dir):
    """8 images of a phantom volume, conditioned as `upscale` does (two slices x 4 metabolites)."""
    cond = build_condition(read_subject(phantom_subject_dir))
    pick = torch.arange(8) + 7 * 6  # slice 6 onwards, in (z, c) order
    return cond.y[pick], cond.s[pick]


@pytest.fixture(scope="module")
def torch_backend(tiny_model_dir):
    return TorchBackend(ModelSet.open(tiny_model_dir))


@pytest.fixture(scope="module")
def ort_backend(tiny_onnx_export):
    with OnnxRuntimeBackend(tiny_onnx_export, threads=1) as backend:
        yield backend


# ------------------------------------------------------------------------------------------ specs


@pytest.mark.parametrize(
    "spec,nfe",
    [
        (SamplerSpec("ftddm", ttrunc=5), 6),
        (SamplerSpec("ftddm", ttrunc=100, steps=7), 101),  # steps is ignored by ftddm
        (SamplerSpec("ftddm-dpmpp", ttrunc=10, steps=3), 4),
        (SamplerSpec("ftddm-dpmpp"), 21),
        (SamplerSpec("ddpm"), 1000),
        (SamplerSpec("ddpm-respaced", steps=7), 7),
        (SamplerSpec("ddpm-respaced"), 100),
        (SamplerSpec("dpmpp", steps=4), 4),
        (SamplerSpec("dpmpp"), 20),
        (SamplerSpec("dpmpp", steps=4, sde=True), 4),
        (SamplerSpec("ftddm-dpmpp", ttrunc=10, steps=3, sde=True), 4),
        (SamplerSpec("ftddm-dpmpp", ttrunc=10, steps=3, passes=3), 10),
        (SamplerSpec("flow"), 1),
        (SamplerSpec("ftddm-distilled"), 2),
        (SamplerSpec("ftddm-distilled", steps=3), 4),
        (SamplerSpec("munet"), 1),
        (SamplerSpec("flow-enhancer"), 2),
    ],
    ids=lambda v: v if isinstance(v, int) else f"{v.name}-{v.ttrunc}-{v.steps}-{v.passes}",
)
def test_nfe_equals_the_backend_calls(spec, nfe):
    assert spec.nfe == nfe and spec.to_dict()["nfe"] == nfe
    backend = CountingBackend(StubBackend())
    k, batch = 5, 2
    y, s = _inputs(k)
    x, reported = sample_images(backend, spec, y, s, batch_size=batch, seed=3)
    n_batches = 3
    assert reported == nfe
    assert x.shape == (k, 1, 64, 64)
    uses_flow = spec.name in ("ftddm", "ftddm-dpmpp", "flow", "ftddm-distilled")
    unet = "unet_full" if spec.name in ("ddpm", "ddpm-respaced", "dpmpp") else "unet"
    expected = Counter({"flow": n_batches * uses_flow, unet: n_batches * (nfe - uses_flow)})
    if spec.baseline_networks:  # one call of each of the baseline's networks, no UNet
        expected = Counter({n: n_batches for n in spec.baseline_networks})
    assert backend.calls == +expected
    assert backend.images == +Counter({name: (n // n_batches) * k for name, n in expected.items()})


def test_every_sampler_is_covered():
    assert set(SAMPLERS) == {
        "ftddm", "ftddm-dpmpp", "ddpm", "ddpm-respaced", "dpmpp", "flow", "tdpm", "ftddm-distilled", "munet",
        "flow-enhancer",
    }


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="ddim"), "unknown sampler"),
        (dict(name="ftddm", ttrunc=0), "ttrunc"),
        (dict(name="ftddm", ttrunc=1001), "ttrunc"),
        (dict(name="dpmpp", steps=0), "steps must be >= 1"),
        (dict(name="ddpm-respaced", steps=-3), "steps must be >= 1"),
        (dict(name="ftddm-dpmpp", ttrunc=10, steps=11), "at most 10 steps"),
        (dict(name="ftddm-dpmpp", ttrunc=5), "at most 5 steps"),  # the default 20 steps do not fit
        (dict(name="dpmpp", steps=1001, lambda_min=None), "at most 1000 steps"),
        (dict(name="dpmpp", steps=996), "at most 995 steps"),  # lambda clipped at -5.1: starts at t = 996
        (dict(name="dpmpp", lambda_min=float("inf")), "lambda_min must be finite"),
        (dict(name="ftddm", clip_x0=(1.0, 0.0)), "clip_x0"),
        (dict(name="ddpm-respaced", steps=2000), "at most 1000 steps"),
        (dict(name="ftddm", tau_d=-0.5), "temperatures"),
        (dict(name="flow", tau_f=float("nan")), "temperatures"),
        (dict(name="ftddm", sde=True), "DPM-Solver"),
        (dict(name="dpmpp", sde="yes"), "sde must be"),
        (dict(name="ftddm-dpmpp", passes=0), "passes must be"),
        (dict(name="ftddm-dpmpp", passes=1.5), "passes must be"),
        (dict(name="ftddm", passes=2), "passes is a setting of ftddm-dpmpp"),
    ],
)
def test_invalid_specs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerSpec(**kwargs)


def test_invalid_batch_size_raises():
    y, s = _inputs(2)
    with pytest.raises(ValueError, match="batch size"):
        sample_images(StubBackend(), SamplerSpec("flow"), y, s, batch_size=0)


# ------------------------------------------------------------------------------- backend parity


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize(
    "spec,atol",
    [
        (SamplerSpec("ftddm", ttrunc=5), BACKEND_ATOL),
        (SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3), BACKEND_ATOL),
        # from pure noise at T = 1000 the first step divides by sqrt(gamma_1000) ~ 5e-5, so the
        # 1e-6 differences of one UNet call come out ~100x larger (then clipped with x0)
        (SamplerSpec("ddpm-respaced", steps=3), 1e-2),
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_same_seed_same_output_on_torch_and_onnxruntime(
    torch_backend, ort_backend, real_condition, spec, atol, batch_size
):
    y, s = real_condition
    y, s = y[:4], s[:4]
    x_torch, nfe_t = sample_images(torch_backend, spec, y, s, batch_size=batch_size, seed=11)
    x_ort, nfe_o = sample_images(ort_backend, spec, y, s, batch_size=batch_size, seed=11)
    assert nfe_t == nfe_o == spec.nfe
    assert x_torch.shape == x_ort.shape == (4, 1, 64, 64)
    assert x_torch.abs().max() > 1e-2, "degenerate output: the comparison would prove nothing"
    err = float((x_torch - x_ort).abs().max())
    assert err <= atol, f"max |torch - onnxruntime| = {err:.3g}"
    # a different seed gives a different sample (the noise really comes from the seed)
    x_other, _ = sample_images(ort_backend, spec, y, s, batch_size=batch_size, seed=12)
    assert float((x_other - x_ort).abs().max()) > 10 * atol


def test_single_network_calls_agree(torch_backend, ort_backend, real_condition):
    y, s = real_condition
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 64, 64, generator=g) * y[:, 1:2]
    t = torch.tensor([1.0, 5.0, 50.0, 100.0, 3.0, 7.0, 99.0, 42.0])
    for full in (False, True):
        a, b = torch_backend.unet(x, y, t, s, full=full), ort_backend.unet(x, y, t, s, full=full)
        assert a.shape == b.shape == (8, 1, 64, 64) and a.dtype == b.dtype == torch.float32
        assert float((a - b).abs().max()) < 1e-4
    tau = torch.full((8,), 0.9)
    a, b = torch_backend.flow_reverse(x, y, tau), ort_backend.flow_reverse(x, y, tau)
    assert float((a - b).abs().max()) < 1e-4


# --------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "spec",
    [SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3, tau_f=0.0), SamplerSpec("flow", tau_f=0.0)],
    ids=lambda sp: sp.name,
)
def test_batch_size_changes_neither_shape_nor_order(torch_backend, real_condition, spec):
    """tau_f = 0 and a deterministic solver: every image's result is independent of its batch."""
    y, s = real_condition
    y, s = y[:7], s[:7]
    done: list[int] = []
    ref, _ = sample_images(torch_backend, spec, y, s, batch_size=3, seed=0, progress=done.append)
    assert done == [3, 6, 7]
    assert ref.shape == (7, 1, 64, 64) and ref.dtype == torch.float32 and ref.device.type == "cpu"
    for b in (1, 7, 16):
        x, _ = sample_images(torch_backend, spec, y, s, batch_size=b, seed=0)
        assert x.shape == ref.shape
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    # order: a reversed input gives the reversed output
    rev, _ = sample_images(torch_backend, spec, y.flip(0), s.flip(0), batch_size=3, seed=0)
    torch.testing.assert_close(rev.flip(0), ref, atol=1e-5, rtol=1e-5)
    # and the images do differ from each other (so the order check means something)
    assert float((ref[0] - ref[1]).abs().max()) > 1e-3


def test_sde_solver_draws_from_the_seed_and_is_the_only_random_dpmpp(torch_backend, real_condition):
    """ftddm-dpmpp at tau_f = 0: the ODE form is deterministic; the SDE form depends on the seed through
    tau_d (and is the ODE's drift alone at tau_d = 0, so then deterministic too)."""
    y, s = real_condition
    y, s = y[:3], s[:3]
    ode = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=4, tau_f=0.0)
    sde = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=4, tau_f=0.0, sde=True)
    assert ode.deterministic and not sde.deterministic and SamplerSpec.from_dict(sde.to_dict()).sde
    assert SamplerSpec("ftddm-dpmpp", tau_f=0.0, tau_d=0.0, sde=True).deterministic
    runs = {seed: sample_images(torch_backend, sde, y, s, batch_size=3, seed=seed)[0] for seed in (1, 2)}
    assert float((runs[1] - runs[2]).abs().max()) > 1e-3
    again, _ = sample_images(torch_backend, sde, y, s, batch_size=3, seed=1)
    assert torch.equal(again, runs[1])
    a, _ = sample_images(torch_backend, ode, y, s, batch_size=3, seed=1)
    b, _ = sample_images(torch_backend, ode, y, s, batch_size=3, seed=2)
    assert torch.equal(a, b) and float((a - runs[1]).abs().max()) > 1e-3


def test_stochastic_samplers_depend_on_seed_and_batch_index_only(torch_backend, real_condition):
    y, s = real_condition
    spec = SamplerSpec("ftddm", ttrunc=4)
    a, _ = sample_images(torch_backend, spec, y[:5], s[:5], batch_size=2, seed=5)
    b, _ = sample_images(torch_backend, spec, y[:5], s[:5], batch_size=2, seed=5)
    assert torch.equal(a, b)
    # batch i of sample_images is sample_batch with the generator seeded by (seed, i)
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    last = sample_batch(torch_backend, spec, y[4:5], s[4:5], gen).x0
    torch.testing.assert_close(a[4:5], last, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ mask


@pytest.mark.parametrize("name", SAMPLERS)
def test_output_is_zero_outside_the_mask(name):
    spec = SamplerSpec(name, ttrunc=6, steps=None if name in ("ftddm", "ddpm", "flow") else 3)
    y, s = _inputs(3)
    x, _ = sample_images(StubBackend(), spec, y, s, batch_size=2, seed=0)
    outside = y[:, 1:2] == 0
    assert torch.count_nonzero(x[outside]) == 0
    assert torch.count_nonzero(x[~outside]) > 0.1 * (~outside).sum()  # (x0 clipping zeroes some inside)
    assert torch.isfinite(x).all()


def test_real_networks_output_zero_outside_the_mask(torch_backend, real_condition):
    y, s = real_condition
    for spec in (SamplerSpec("ftddm", ttrunc=3), SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=2)):
        counting = CountingBackend(torch_backend)
        x, nfe = sample_images(counting, spec, y, s, batch_size=5)  # batches of 5 and 3
        assert nfe == spec.nfe and counting.calls == {"flow": 2, "unet": 2 * (spec.nfe - 1)}
        assert counting.images == {"flow": 8, "unet": 8 * (spec.nfe - 1)}
        assert torch.count_nonzero(x[y[:, 1:2] == 0]) == 0
        assert torch.count_nonzero(x[y[:, 1:2] == 1]) > 0


# ------------------------------------------------------------------------------------- precision


def test_bf16_torch_backend_runs_and_stays_close_to_fp32(tiny_model_dir, torch_backend, real_condition):
    y, s = real_condition
    bf16 = TorchBackend(ModelSet.open(tiny_model_dir), precision="bf16")
    assert bf16.describe()["precision"] == "bf16" and torch_backend.describe()["precision"] == "fp32"
    spec = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3, tau_f=0.5)
    a, _ = sample_images(torch_backend, spec, y, s, batch_size=8, seed=1)
    b, _ = sample_images(bf16, spec, y, s, batch_size=8, seed=1)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    inside = y[:, 1:2] == 1
    corr = np.corrcoef(a[inside].numpy(), b[inside].numpy())[0, 1]
    assert corr > 0.9, f"bf16 vs fp32 correlation {corr:.3f}"
    assert not torch.equal(a, b), "bf16 autocast had no effect"
    # one UNet call: bf16 differs from fp32 by bf16 rounding, not by a broken graph
    x = torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 10.0)
    e32, e16 = torch_backend.unet(x, y, t, s), bf16.unet(x, y, t, s)
    assert e16.dtype == torch.float32
    assert float((e32 - e16).abs().max()) < 0.1 * max(1.0, float(e32.abs().max()))


def test_torch_backend_rejects_bad_settings(tiny_model_dir, tmp_path):
    models = ModelSet.open(tiny_model_dir)
    with pytest.raises(ValueError, match="precision"):
        TorchBackend(models, precision="int8")
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        TorchBackend(models, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graph"):
        TorchBackend(models, cuda_graph=True)
    # a model set without unet_full cannot run the DDPM baselines, and says so
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("unet", "flow"):
        for ext in (".safetensors", ".json"):
            shutil.copyfile((tiny_model_dir / name).with_suffix(ext), (partial / name).with_suffix(ext))
    backend = TorchBackend(ModelSet.open(partial))
    y, s = _inputs(1)
    with pytest.raises(KeyError, match="unet_full"):
        sample_images(backend, SamplerSpec("dpmpp", steps=2), y, s)


# ------------------------------------------------------------------------------------------ factory


def test_open_backend_and_the_onnx_cache(tiny_model_dir, tiny_onnx_export, tmp_path, monkeypatch):
    monkeypatch.setenv("FTDDM_TRT_CACHE", str(tmp_path / "cache"))
    exports = []

    def fake_export(models, folder, force=False, log=print):  # the real one is tested in test_export.py
        exports.append(folder)
        shutil.copytree(tiny_onnx_export, folder, dirs_exist_ok=True)

    monkeypatch.setattr("ftddm_trt.export.onnx_export.export_model_set", fake_export)
    b1 = factory.open_backend("onnxruntime", model=tiny_model_dir)
    b2 = factory.open_backend("onnxruntime", model=tiny_model_dir)
    assert isinstance(b1, OnnxRuntimeBackend) and len(exports) == 1, "the export must be made once and cached"
    assert exports[0].parent == tmp_path / "cache" / "onnx" and b2.root == exports[0]
    assert set(b1.describe()["models"]) == {"unet", "unet_full", "flow"}

    assert isinstance(factory.open_backend("torch", model=tiny_model_dir), TorchBackend)
    assert factory.open_backend("onnxruntime", onnx_dir=tiny_onnx_export).root == tiny_onnx_export
    with pytest.raises(ValueError, match="--engines"):
        factory.open_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown backend"):
        factory.open_backend("openvino")
    with pytest.raises(FileNotFoundError, match="is not an export"):
        OnnxRuntimeBackend(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        factory.open_backend("torch", model=tmp_path / "nowhere")


def test_passes_restart_the_solver_from_each_output(torch_backend, real_condition):
    """passes = 3 equals the solver run by hand three times, each from sqrt(gamma_Ttrunc) * previous x0 * M
    (and data consistency, when on, applied once at the end); it survives a to_dict / from_dict round trip."""
    import math

    from ftddm_trt.diffusion import CosineSchedule, dpm_solver_pp_sample
    from ftddm_trt.diffusion.consistency import data_consistency
    from ftddm_trt.engine.pipeline import make_eps_fn

    y, s = real_condition
    y, s = y[:2], s[:2]
    spec = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3, tau_f=0.0, passes=3)
    assert SamplerSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["nfe"] == 10
    out = sample_batch(torch_backend, spec, y, s, torch.Generator().manual_seed(0))
    assert out.nfe == 10

    sched = CosineSchedule(1000)
    mask = y[:, 1:2]
    eps_fn = make_eps_fn(torch_backend, y, s, full=False)
    root_gamma = math.sqrt(float(sched.gammas[20]))
    with torch.no_grad():
        start = torch_backend.flow_reverse(torch.zeros(2, 1, 64, 64), y, torch.zeros(2)) * mask
        outputs = []
        for _ in range(3):
            outputs.append(dpm_solver_pp_sample(eps_fn, start, mask, sched, t_start=20, steps=3, clip=spec.clip_x0).x0)
            start = root_gamma * outputs[-1] * mask
    first, x_last = outputs[0], outputs[-1]
    torch.testing.assert_close(out.x0, data_consistency(x_last, y[:, 0:1], s) * mask, atol=1e-5, rtol=1e-5)
    one = sample_batch(
        torch_backend,
        SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3, tau_f=0.0, data_consistency=False),
        y,
        s,
        torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(one.x0, first, atol=1e-5, rtol=1e-5)
    assert float((out.x0 - data_consistency(first, y[:, 0:1], s) * mask).abs().max()) > 1e-4  # the passes did something


@pytest.mark.parametrize("data_consistency", [True, False])
def test_on_pass_reports_what_each_smaller_passes_returns(torch_backend, real_condition, data_consistency):
    """Pass k reported by on_pass equals a separate run with passes = k and the same seed, also with a
    stochastic flow draw (tau_f 0.9) and with data consistency on; samplers without passes report once."""
    y, s = real_condition
    y, s = y[:2], s[:2]
    spec = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3, tau_f=0.9, passes=3, data_consistency=data_consistency)
    reported: list[torch.Tensor] = []
    out = sample_batch(torch_backend, spec, y, s, torch.Generator().manual_seed(5), on_pass=reported.append)
    assert len(reported) == 3
    torch.testing.assert_close(reported[-1], out.x0)
    for k in (1, 2):
        alone = sample_batch(torch_backend, replace(spec, passes=k), y, s, torch.Generator().manual_seed(5))
        torch.testing.assert_close(reported[k - 1], alone.x0, atol=1e-6, rtol=1e-6)
    assert float((reported[0] - reported[1]).abs().max()) > 1e-4
    once: list[torch.Tensor] = []
    flow = sample_batch(
        torch_backend, SamplerSpec("flow", ttrunc=20), y, s, torch.Generator().manual_seed(5), on_pass=once.append
    )
    assert len(once) == 1 and torch.equal(once[0], flow.x0)
