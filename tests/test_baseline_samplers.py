"""The ``munet`` and ``flow-enhancer`` samplers: one sampling loop (``pipeline.sample_batch``) over every
backend, the ONNX export of both networks, `package-model` -> `upscale --sampler munet|flow-enhancer` on
torch and ONNX Runtime (parity), and the error for a model without the networks. Tiny networks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.engine.backend import NETWORKS, Backend, MissingNetwork
from ftddm_trt.engine.factory import onnx_export_for
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.engine.pipeline import SAMPLERS, SamplerSpec, sample_batch, sample_images
from ftddm_trt.engine.tensorrt_backend import TensorRTBackend
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.engine.triton_backend import NETWORK_TENSORS, TRITON_MODELS, encode_sampler_settings
from ftddm_trt.export.manifest import read_manifest
from ftddm_trt.export.onnx_export import NETWORK_IO
from ftddm_trt.models.flow_enhancer import FlowEnhancer, FlowEnhancerConfig
from ftddm_trt.models.io import save_model
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.models.munet import MUNet, MUNetConfig
from ftddm_trt.serving.bls import BLSBackend, run_sampler
from ftddm_trt.training.package import package_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.eval()


@pytest.fixture(scope="module")
def baseline_model(tmp_path_factory) -> Path:
    """A model folder made by `package-model` from two (fake) runs: a tiny MUNet and its flow enhancer at 64 px."""
    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    mcfg = MUNetConfig.preset("tiny").replace(image_size=64)
    ecfg = FlowEnhancerConfig.preset("tiny").replace(image_size=64)
    (root / "munet_run").mkdir()
    (root / "enh_run").mkdir()
    save_model(_perturbed(MUNet(mcfg), 1), mcfg, root / "munet_run" / "best")
    save_model(_perturbed(FlowEnhancer(ecfg), 2), ecfg, root / "enh_run" / "best")
    package_model({"munet": root / "munet_run", "flow_enhancer": root / "enh_run"}, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def baseline_cache(baseline_model, tmp_path_factory) -> Path:
    """An ``FTDDM_TRT_CACHE`` holding the model's ONNX export, made once (export + parity check take ~20 s)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTDDM_TRT_CACHE", str(cache))
        onnx_export_for(ModelSet.open(baseline_model))
    return cache


def _condition(b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    y = torch.rand(b, 4, 64, 64, generator=g)
    y[:, 1] = (y[:, 1] > 0.3).float()
    return y, torch.tensor([2.0, 4.0, 8.0][:b])


# ------------------------------------------------------------------------------------------ specs


def test_specs_of_the_baseline_samplers():
    assert {"munet", "flow-enhancer"} <= set(SAMPLERS) and {"munet", "flow_enhancer"} <= set(NETWORKS)
    munet, enh = SamplerSpec("munet"), SamplerSpec("flow-enhancer")
    assert (munet.nfe, enh.nfe) == (1, 2)
    assert munet.baseline_networks == ("munet",) and enh.baseline_networks == ("munet", "flow_enhancer")
    assert munet.deterministic and not enh.deterministic and SamplerSpec("flow-enhancer", tau_f=0.0).deterministic
    assert not (munet.uses_flow or enh.uses_flow or munet.full_chain_unet) and munet.start_network is None
    for spec in (munet, enh):
        assert SamplerSpec.from_dict(spec.to_dict()) == spec
    # every runtime names the two networks' tensors alike
    for net in ("munet", "flow_enhancer"):
        inputs, outputs = NETWORK_IO[net]
        assert NETWORK_TENSORS[net] == (tuple(s.name for s in inputs), outputs[0].name)
        assert net in TRITON_MODELS


# ------------------------------------------------------------------------------------------ loop


def test_torch_backend_runs_both_samplers(baseline_model):
    y, s = _condition()
    backend = TorchBackend(ModelSet.open(baseline_model))
    x_m, nfe = sample_images(backend, SamplerSpec("munet", data_consistency=False), y, s, batch_size=2)
    assert nfe == 1 and x_m.shape == (3, 1, 64, 64) and torch.count_nonzero(x_m[y[:, 1:2] == 0]) == 0
    # the loop adds nothing but the mask and the clamp to MUNet's own output
    with torch.no_grad():
        direct = backend.nets["munet"](y, s).clamp(0.0, 3.0) * y[:, 1:2]
    torch.testing.assert_close(x_m, direct)
    spec = SamplerSpec("flow-enhancer", tau_f=0.9, data_consistency=False)
    x_e, nfe = sample_images(backend, spec, y, s, batch_size=2, seed=1)
    assert nfe == 2 and torch.count_nonzero(x_e[y[:, 1:2] == 0]) == 0 and not torch.allclose(x_e, x_m)
    again, _ = sample_images(backend, spec, y, s, batch_size=2, seed=1)
    torch.testing.assert_close(again, x_e)  # the seed decides the draw
    other, _ = sample_images(backend, spec, y, s, batch_size=2, seed=2)
    assert not torch.allclose(other, x_e)


def test_onnx_export_and_runtime_parity_with_torch(baseline_model, baseline_cache, monkeypatch):
    """Both networks export (with the export's own parity check); ONNX Runtime samples what torch samples."""
    monkeypatch.setenv("FTDDM_TRT_CACHE", str(baseline_cache))
    onnx_dir = onnx_export_for(ModelSet.open(baseline_model))  # the cached export
    manifest = read_manifest(onnx_dir)
    assert set(manifest["networks"]) == {"munet", "flow_enhancer"} and manifest["flow_ttrunc"] is None
    assert [i["name"] for i in manifest["networks"]["flow_enhancer"]["inputs"]] == ["eps", "y", "x_munet", "tau_f"]
    assert [i["name"] for i in manifest["networks"]["munet"]["inputs"]] == ["y", "s"]
    y, s = _condition()
    ort, ref = OnnxRuntimeBackend(onnx_dir, threads=1), TorchBackend(ModelSet.open(baseline_model))
    for spec in (SamplerSpec("munet"), SamplerSpec("flow-enhancer", tau_f=0.9)):
        a, _ = sample_images(ort, spec, y, s, batch_size=2, seed=3)
        b, _ = sample_images(ref, spec, y, s, batch_size=2, seed=3)
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    with pytest.raises(MissingNetwork, match="unet.onnx"):
        ort.unet(torch.zeros(1, 1, 64, 64), y[:1], torch.ones(1), s[:1])


def test_triton_server_loop_runs_the_same_sampler(baseline_model):
    """The server loop (BLS requests to ftddm_munet / ftddm_flow_enhancer) gives the client loop's output."""
    backend = TorchBackend(ModelSet.open(baseline_model))
    nets = {TRITON_MODELS[n]: n for n in ("munet", "flow_enhancer")}

    def infer(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        squeeze = {k: v.reshape(-1) if v.ndim == 2 else v for k, v in t.items()}  # scalars travel as (B, 1)
        if nets[model] == "munet":
            out = backend.munet(squeeze["y"], squeeze["s"])
        else:
            out = backend.enhancer_reverse(squeeze["eps"], squeeze["y"], squeeze["x_munet"], squeeze["tau_f"])
        return {outputs[0]: out.numpy()}

    bls = BLSBackend(infer)
    y, s = _condition(2)
    spec = SamplerSpec("flow-enhancer", tau_f=0.5)
    x, nfe = run_sampler(bls, y.numpy(), s.numpy(), encode_sampler_settings(spec, 7))
    assert nfe == 2 and bls.calls == 2
    ref = sample_batch(backend, spec, y, s, torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.from_numpy(x), ref.x0)


def test_backends_without_the_networks_refuse_by_name(tiny_model_dir):
    y, s = _condition(1)

    class Bare(Backend):
        name = "bare"

        def unet(self, x_t, y, t, s, full=False):
            raise AssertionError

        def flow_reverse(self, eps, y, tau_f):
            raise AssertionError

    with pytest.raises(MissingNetwork, match="munet"):
        sample_images(Bare(), SamplerSpec("munet"), y, s)
    with pytest.raises(MissingNetwork, match="munet.safetensors"):
        TorchBackend(ModelSet.open(tiny_model_dir)).munet(y, s)
    with pytest.raises(FileNotFoundError, match="munet.safetensors, flow_enhancer.safetensors"):
        ModelSet.open(tiny_model_dir).require(("munet", "flow_enhancer"), "flow-enhancer")
    # TensorRT (cannot run here): its engine lookup names the missing engine
    trt = TensorRTBackend.__new__(TensorRTBackend)
    trt.root, trt.engines = Path("engines"), {}
    with pytest.raises(MissingNetwork, match="no munet engine"):
        trt.munet(y, s)


# ------------------------------------------------------------------------------------------ CLI


def _outputs(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).as_posix(): np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.rglob("*.nii.gz"))}


@pytest.mark.parametrize("sampler", ["munet", "flow-enhancer"])
def test_upscale_cli_torch_and_onnxruntime_agree(baseline_model, baseline_cache, phantom_subject_dir, tmp_path,
                                                monkeypatch, sampler):
    monkeypatch.setenv("FTDDM_TRT_CACHE", str(baseline_cache))  # onnxruntime runs the cached export
    outs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--sampler", sampler,
                                  "--backend", backend, "--model", str(baseline_model), "--metabolites", "Gly",
                                  "--tau-f", "0.9"])
        assert res.exit_code == 0, res.output
        outs[backend] = _outputs(out)
        run = json.loads(next(out.rglob("run.json")).read_text())
        assert run["sampler"]["name"] == sampler and run["nfe"] == (1 if sampler == "munet" else 2)
    assert outs["torch"] and outs["torch"].keys() == outs["onnxruntime"].keys()
    for name, arr in outs["torch"].items():
        np.testing.assert_allclose(outs["onnxruntime"][name], arr, atol=2e-3 * max(1.0, float(np.abs(arr).max())))


def test_upscale_cli_names_the_missing_network(tiny_model_dir, baseline_model, phantom_subject_dir, tmp_path):
    for model, sampler, missing in ((tiny_model_dir, "munet", "munet.safetensors"),
                                    (tiny_model_dir, "flow-enhancer", "flow_enhancer.safetensors")):
        out = tmp_path / "out"
        res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--sampler", sampler,
                                  "--backend", "torch", "--model", str(model), "--metabolites", "Gly"])
        assert res.exit_code == 2, res.output
        assert missing in "".join(res.output.split()) and not out.exists()
    # a model folder with only the MUNet runs munet but not flow-enhancer
    only = tmp_path / "munet_only"
    only.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copyfile((baseline_model / "munet").with_suffix(ext), (only / "munet").with_suffix(ext))
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(tmp_path / "o2"), "--sampler",
                              "flow-enhancer", "--backend", "torch", "--model", str(only), "--metabolites", "Gly"])
    assert res.exit_code == 2 and "flow_enhancer.safetensors" in "".join(res.output.split())
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(tmp_path / "o3"), "--sampler",
                              "munet", "--backend", "torch", "--model", str(only), "--samples", "3"])
    assert res.exit_code == 2 and "MUNet has no randomness" in " ".join(res.output.split())


def test_triton_client_sends_the_baselines_tensors_and_requires_their_models(monkeypatch):
    """Pure parts of the Triton client (no server here): the request of each network, and `open_backend`
    asking the server for the baseline's models instead of the UNet and flow."""
    from ftddm_trt.engine import factory, triton_backend

    client = triton_backend.TritonBackend.__new__(triton_backend.TritonBackend)
    client.models, client.timeout_s, sent = dict(TRITON_MODELS), 1.0, []

    def fake_infer(model, arrays, outputs, timeout_s, parameters=None):
        sent.append((model, {k: v.shape for k, v in arrays.items()}, dict(outputs)))
        return {name: np.zeros(shape, np.float32) for name, shape in outputs.items()}

    client._infer = fake_infer
    y, s = _condition(2)
    assert client.munet(y, s).shape == (2, 1, 64, 64)
    assert client.enhancer_reverse(torch.zeros(2, 1, 64, 64), y, torch.zeros(2, 1, 64, 64), torch.ones(2)).shape == (
        2, 1, 64, 64)
    assert sent[0] == ("ftddm_munet", {"y": (2, 4, 64, 64), "s": (2, 1)}, {"x0": (2, 1, 64, 64)})
    assert sent[1][0] == "ftddm_flow_enhancer" and sent[1][1] == {
        "eps": (2, 1, 64, 64), "y": (2, 4, 64, 64), "x_munet": (2, 1, 64, 64), "tau_f": (2, 1)}

    made = []
    monkeypatch.setattr(triton_backend, "TritonBackend", lambda url, **kw: made.append((url, kw)) or "backend")
    assert factory.open_backend("triton", url="h:1", require=("munet", "flow_enhancer")) == "backend"
    assert made == [("h:1", {"retry_s": None, "require": ("munet", "flow_enhancer")})]
    factory.open_backend("triton", url="h:1")
    assert made[-1] == ("h:1", {"retry_s": None})  # the default: the UNet and the flow
