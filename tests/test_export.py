"""ONNX export (manifest, graph metadata, parity refusal, no overwrite) and the TensorRT build's
pure parts, its refusal without a GPU, and (on an NVIDIA GPU with TensorRT only) a real engine build."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.atomic import OutputError
from ftddm_trt.cli.main import app
from ftddm_trt.export import onnx_export, tensorrt_build
from ftddm_trt.export.onnx_export import OPSET, ParityError, export_model_set
from ftddm_trt.export.tensorrt_build import (
    BatchProfile,
    TensorRTUnavailable,
    cuda_device_name,
    engine_cache_key,
    engine_filename,
    require_tensorrt,
    volume_profile,
)
from ftddm_trt.models.model_set import ModelSet

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()

EXPECTED_IO = {
    "unet": ({"x_t": [1, 64, 64], "y": [4, 64, 64], "t": [], "s": []}, {"eps": [1, 64, 64]}),
    "unet_full": ({"x_t": [1, 64, 64], "y": [4, 64, 64], "t": [], "s": []}, {"eps": [1, 64, 64]}),
    "flow": ({"eps": [1, 64, 64], "y": [4, 64, 64], "tau_f": []}, {"x": [1, 64, 64]}),
}


def _flat(text: str) -> str:
    return "".join(text.split())


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- ONNX export


def test_manifest_and_graph_metadata(tiny_onnx_export, tiny_model_dir):
    manifest = json.loads((tiny_onnx_export / "manifest.json").read_text())
    assert manifest["opset"] == OPSET == 18
    assert manifest["model_hashes"] == ModelSet.open(tiny_model_dir).hashes()
    assert sorted(manifest["networks"]) == ["flow", "unet", "unet_full"]
    assert sorted(p.name for p in tiny_onnx_export.iterdir()) == [
        ".ftddm-trt.json",
        "flow.onnx",
        "manifest.json",
        "unet.onnx",
        "unet_full.onnx",
    ]
    for name, (ins, outs) in EXPECTED_IO.items():
        info = manifest["networks"][name]
        path = tiny_onnx_export / info["onnx"]
        assert info["onnx"] == f"{name}.onnx" and info["onnx_sha256"] == _sha256(path)
        assert info["model_sha256"] == _sha256(tiny_model_dir / f"{name}.safetensors")
        assert info["config"]["config"]["image_size"] == 64
        # manifest: names, shapes with a symbolic batch, dtypes
        assert [i["name"] for i in info["inputs"]] == list(ins)
        assert [o["name"] for o in info["outputs"]] == list(outs)
        for entry, shape in [*zip(info["inputs"], ins.values()), *zip(info["outputs"], outs.values())]:
            assert entry["shape"] == ["batch", *shape] and entry["dtype"] == "float32"
        parity = info["parity"]
        assert 0 <= parity["max_abs_error"] <= parity["atol"] == onnx_export.PARITY_ATOL
        assert parity["max_abs_error"] == max(parity["cases"].values())
        assert {"random_b1", "random_b3", "random_b8", "real_0", "real_1"} <= set(parity["cases"])

        # the graph itself, read with onnx
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] == 18
        for values, expected in ((model.graph.input, ins), (model.graph.output, outs)):
            assert [v.name for v in values] == list(expected)
            for v in values:
                tt = v.type.tensor_type
                assert tt.elem_type == onnx.TensorProto.FLOAT
                dims = list(tt.shape.dim)
                assert dims[0].dim_param == "batch" and not dims[0].HasField("dim_value")
                assert [d.dim_value for d in dims[1:]] == expected[v.name]
                assert all(not d.dim_param for d in dims[1:])


def test_exported_graphs_take_any_batch(tiny_onnx_export):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_onnx_export / "unet.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        feeds = {"x_t": np.zeros((b, 1, 64, 64), np.float32), "y": np.zeros((b, 4, 64, 64), np.float32),
                 "t": np.full(b, 3.0, np.float32), "s": np.full(b, 4.0, np.float32)}
        (out,) = sess.run(None, feeds)
        assert out.shape == (b, 1, 64, 64)


def test_export_folder_gets_ordinary_permissions(tiny_onnx_export):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(tiny_onnx_export.stat().st_mode) == 0o777 & ~umask


def _perturbed_flow_model(tiny_model_dir: Path, folder: Path) -> Path:
    """A model folder whose flow differs from the one in the tiny export."""
    from ftddm_trt.models.io import load_model, save_model

    flow = load_model(tiny_model_dir / "flow")
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05)
    save_model(flow, flow.config, folder / "flow")
    return folder


@pytest.fixture
def mismatched_export(monkeypatch, tiny_onnx_export, tiny_model_dir, tmp_path):
    """Export whose graph does not match the weights: export_network writes the tiny export's flow.onnx
    (cheap) while the model folder holds a perturbed flow, so the real parity check must fail."""
    calls = []

    def wrong_graph(name, net, path):
        calls.append(name)
        shutil.copyfile(tiny_onnx_export / f"{name}.onnx", path)

    monkeypatch.setattr(onnx_export, "export_network", wrong_graph)
    return _perturbed_flow_model(tiny_model_dir, tmp_path / "model"), calls


def test_parity_failure_refuses_to_finish_and_writes_nothing(mismatched_export, tmp_path):
    model_dir, calls = mismatched_export
    out = tmp_path / "exports" / "onnx"
    with pytest.raises(ParityError, match=r"flow: ONNX Runtime differs from PyTorch by"):
        export_model_set(ModelSet.open(model_dir), out, log=lambda _m: None)
    assert calls == ["flow"]
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == [], "a staging folder was left behind"

    # an existing export replaced with force stays untouched when the new one fails
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ParityError):
        export_model_set(ModelSet.open(model_dir), out, force=True, log=lambda _m: None)
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["onnx"]


def test_parity_tolerance_is_read_at_call_time(tiny_onnx_export, tiny_model_dir, tmp_path, monkeypatch):
    """The right graph passes the check; with PARITY_ATOL = -1 the same export is refused."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copyfile((tiny_model_dir / "flow").with_suffix(ext), (model_dir / "flow").with_suffix(ext))
    monkeypatch.setattr(onnx_export, "export_network",
                        lambda name, net, path: shutil.copyfile(tiny_onnx_export / f"{name}.onnx", path))
    manifest = export_model_set(ModelSet.open(model_dir), tmp_path / "ok", log=lambda _m: None)
    assert manifest["networks"]["flow"]["parity"]["max_abs_error"] < 1e-4
    monkeypatch.setattr(onnx_export, "PARITY_ATOL", -1.0)
    with pytest.raises(ParityError, match="> -1"):
        export_model_set(ModelSet.open(model_dir), tmp_path / "refused", log=lambda _m: None)
    assert not (tmp_path / "refused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ok"]


def test_cli_export_reports_parity_failure(mismatched_export, tmp_path):
    model_dir, _ = mismatched_export
    out = tmp_path / "onnx"
    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(model_dir)])
    assert res.exit_code == 2
    assert "differs from PyTorch" in " ".join(res.output.split())
    assert not out.exists()


def test_export_refuses_to_overwrite_without_force(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(onnx_export, "export_network", lambda *a: pytest.fail("must refuse before exporting"))
    with pytest.raises(OutputError, match="not empty"):
        export_model_set(ModelSet.open(tiny_model_dir), out, log=lambda _m: None)
    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "not empty" in " ".join(res.output.split())
    res = runner.invoke(app, ["export", "--out", str(tiny_model_dir / "onnx"), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "inside the input folder" in " ".join(res.output.split())
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "no_model")])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not (tmp_path / "x").exists()


def test_exporter_noise_is_silenced_but_errors_are_not():
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    dynamo = logging.getLogger("torch._dynamo.something")
    before = {n: logging.getLogger(n).level for n in onnx_export.NOISY_LOGGERS}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with onnx_export.quiet_exporter():
            assert not registration.isEnabledFor(logging.WARNING)
            assert not dynamo.isEnabledFor(logging.WARNING)
            assert registration.isEnabledFor(logging.ERROR)
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
            warnings.warn("# The axis name: batch will not be used, since ...", UserWarning)
            warnings.warn("something real", UserWarning)
        assert [str(w.message) for w in seen] == ["something real"]
    assert {n: logging.getLogger(n).level for n in onnx_export.NOISY_LOGGERS} == before
    assert registration.isEnabledFor(logging.WARNING)
    with pytest.raises(RuntimeError, match="boom"):
        with onnx_export.quiet_exporter():
            raise RuntimeError("boom")
    assert {n: logging.getLogger(n).level for n in onnx_export.NOISY_LOGGERS} == before


# ------------------------------------------------------------------------- TensorRT: pure functions


def test_volume_profile():
    assert volume_profile(16, 128) == BatchProfile(1, 16, 128)
    assert volume_profile(1, 128) == BatchProfile(1, 1, 128)
    assert volume_profile(200, 128) == BatchProfile(1, 200, 200)  # max never below opt
    with pytest.raises(ValueError, match="batch size"):
        volume_profile(0, 128)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(2, 1, 4)
    with pytest.raises(ValueError):
        BatchProfile(0, 1, 4)


def test_engine_cache_key_changes_with_each_input():
    base = dict(onnx_sha256="a" * 64, trt_version="10.9.0", gpu_name="NVIDIA H100 80GB HBM3", precision="fp16",
                profile=BatchProfile(1, 16, 128))
    key = engine_cache_key(**base)
    assert len(key) == 64 and key == engine_cache_key(**base)
    changes = dict(onnx_sha256="b" * 64, trt_version="10.9.1", gpu_name="NVIDIA L4", precision="fp32",
                   profile=BatchProfile(1, 8, 128), build_options={"workspace_gib": 8})
    keys = {key}
    for field, value in changes.items():
        keys.add(engine_cache_key(**{**base, field: value}))
    keys.add(engine_cache_key(**{**base, "profile": BatchProfile(2, 16, 128)}))
    keys.add(engine_cache_key(**{**base, "profile": BatchProfile(1, 16, 64)}))
    assert len(keys) == 9, "some input does not reach the key"
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key(**{**base, "precision": "int8"})


def test_engine_filename():
    key = "0123456789abcdef" + "f" * 48
    assert engine_filename("unet_full", key) == "unet_full-0123456789abcdef.plan"
    assert engine_filename("flow", key) != engine_filename("unet", key)


# ---------------------------------------------------------------------- TensorRT: refusal without GPU


def test_gpu_name_is_the_device_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: {0: "NVIDIA L4", 1: "NVIDIA H200"}[i])
    assert cuda_device_name() == "NVIDIA H200"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_device_name() is None


@pytest.mark.skipif(cuda_device_name() is not None, reason="checks the refusal on a machine without an NVIDIA GPU")
def test_require_tensorrt_refuses_before_importing_tensorrt(tmp_path, monkeypatch):
    sys.modules.pop("tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU found"):
        require_tensorrt()
    assert "tensorrt" not in sys.modules
    # the backend and the builder refuse the same way, before touching any TensorRT runtime
    from ftddm_trt.engine.factory import open_backend

    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU"):
        open_backend("tensorrt", engine_dir=tmp_path)
    (tmp_path / "manifest.json").write_text('{"flow_ttrunc": null, "networks": {}}')  # read first (Ttrunc check)
    with pytest.raises(TensorRTUnavailable):
        tensorrt_build.build_engines(tmp_path, tmp_path / "engines")
    assert "tensorrt" not in sys.modules and not (tmp_path / "engines").exists()

    # a GPU without the package: named in the message, still no import
    monkeypatch.setattr(tensorrt_build, "cuda_device_name", lambda: "NVIDIA L4")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorrt" else real_find_spec(n, *a))
    with pytest.raises(
        TensorRTUnavailable, match=r"found GPU 'NVIDIA L4' but the Python package 'tensorrt' is not installed"
    ):
        require_tensorrt()
    assert "tensorrt" not in sys.modules


@pytest.mark.skipif(cuda_device_name() is not None, reason="checks the refusal on a machine without an NVIDIA GPU")
def test_build_engine_cli_refuses_clearly(tiny_onnx_export, tmp_path):
    out = tmp_path / "engines"
    res = runner.invoke(app, ["build-engine", "--onnx", str(tiny_onnx_export), "--out", str(out)])
    assert res.exit_code == 3, res.output
    text = " ".join(res.output.split())
    assert "no NVIDIA GPU found" in text and "--backend onnxruntime" in text
    assert "Traceback" not in res.output and not out.exists()
    res = runner.invoke(app, ["build-engine", "--onnx", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 2 and "holds no manifest.json" in " ".join(res.output.split())
    res = runner.invoke(
        app, ["build-engine", "--onnx", str(tiny_onnx_export), "--out", str(out), "--precision", "int8"]
    )
    assert res.exit_code == 2 and "--precision must be one of" in res.output
    assert "tensorrt" not in sys.modules


# -------------------------------------------------------------------------- TensorRT: a real build


def _have_gpu_and_tensorrt() -> bool:
    return cuda_device_name() is not None and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not _have_gpu_and_tensorrt(), reason="TensorRT engine build needs an NVIDIA GPU and the tensorrt package"
)
@pytest.mark.parametrize("precision,atol", [("fp16", 3e-2), ("fp32", 1e-3)])
def test_tensorrt_engines_match_onnxruntime(tiny_onnx_export, tmp_path, precision, atol):
    from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
    from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
    from ftddm_trt.engine.tensorrt_backend import TensorRTBackend

    out = tmp_path / "engines"
    logs: list[str] = []
    manifest = tensorrt_build.build_engines(tiny_onnx_export, out, batch_size=4, precision=precision, log=logs.append)
    assert set(manifest["networks"]) == {"unet", "unet_full", "flow"} and manifest["precision"] == precision
    assert manifest["profile"] == {"min": 1, "opt": 4, "max": 128}
    for info in manifest["networks"].values():
        assert (out / info["engine"]).is_file()
    # a second build reuses every engine from the cache
    logs.clear()
    assert (
        tensorrt_build.build_engines(tiny_onnx_export, out, batch_size=4, precision=precision, log=logs.append)
        == manifest
    )
    assert sum("cached engine" in m for m in logs) == 3

    g = torch.Generator().manual_seed(0)
    y = torch.rand(6, 4, 64, 64, generator=g)
    y[:, 1] = (y[:, 1] > 0.3).float()
    s = torch.tensor([4.0, 2.0, 8.0, 3.2, 4.0, 2.0])
    x = torch.randn(6, 1, 64, 64, generator=g)
    t = torch.tensor([1.0, 10.0, 50.0, 100.0, 3.0, 77.0])
    with TensorRTBackend(out) as trt_b, OnnxRuntimeBackend(tiny_onnx_export) as ort_b:
        assert trt_b.describe()["precision"] == precision
        for full in (False, True):
            a = trt_b.unet(x, y, t, s, full=full).cpu()
            b = ort_b.unet(x, y, t, s, full=full)
            assert float((a - b).abs().max()) <= atol * max(1.0, float(b.abs().max()))
        tau = torch.full((6,), 0.9)
        a, b = trt_b.flow_reverse(x, y, tau).cpu(), ort_b.flow_reverse(x, y, tau)
        assert float((a - b).abs().max()) <= atol * max(1.0, float(b.abs().max()))
        spec = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=3)
        xa, _ = sample_images(trt_b, spec, y, s, batch_size=4, seed=0)
        xb, _ = sample_images(ort_b, spec, y, s, batch_size=4, seed=0)
        assert torch.isfinite(xa).all()
        assert float((xa - xb).abs().max()) <= 5 * atol * max(1.0, float(xb.abs().max()))
