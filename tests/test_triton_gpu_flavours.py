"""The GPU flavours of the Triton repository: ``gpu-python`` (Python-backend models running TensorRT
engines, loadable by a server with only the Python backend) and the ONNX Runtime + TensorRT accelerator
of ``gpu`` with its engine cache path and profile shapes. Every config is schema-validated (Triton's
ModelConfig) by ``validate_repository``; the batching helpers the Python models share are tested here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
from test_triton_repo import _fake_engines, _fake_export
from typer.testing import CliRunner

from ftddm_trt.engine.triton_backend import SAMPLER_MODEL, TRITON_MODELS
from ftddm_trt.serving.batching import as_graph_rank, merge, split
from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import ConfigError, RepoOptions, default_network_io, profile_shapes
from ftddm_trt.serving.repository.validate import validate_config, validate_repository


def _quiet(_m):
    pass


def test_gpu_python_repository(tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    export = _fake_export(tmp_path / "onnx", networks=tuple(TRITON_MODELS))
    engines = _fake_engines(tmp_path / "engines")
    out = tmp_path / "repo"
    meta = build_repository(export, out, "gpu-python", engines_dir=engines, log=_quiet)
    assert meta["flavor"] == "gpu-python"
    configs = validate_repository(out)
    for n in TRITON_MODELS.values():
        cfg = configs[n]
        assert cfg.backend == "python" and not cfg.platform
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert cfg.parameters["engine_file"].string_value == "model.plan"
        assert (out / n / "1" / "model.plan").read_bytes() == b"placeholder plan"
        assert "EngineRunner" in (out / n / "1" / "model.py").read_text()
        assert cfg.parameters["engine_sha256"].string_value == hashlib.sha256(b"placeholder plan").hexdigest()
    assert configs["ftddm_flow"].parameters["flow_ttrunc"].string_value == "100"
    assert configs[SAMPLER_MODEL].instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    with pytest.raises(ConfigError, match="give --engines"):
        build_repository(export, tmp_path / "r2", "gpu-python", log=_quiet)
    (out / "ftddm_unet" / "1" / "model.plan").unlink()
    with pytest.raises(ConfigError, match="lacks model.plan"):
        validate_repository(out)


def test_engines_are_verified_at_generation_and_at_load(tmp_path, monkeypatch):
    """Integrity (issue 12) on the gpu flavours' engines: triton-repo refuses an engine folder whose
    engine differs from its manifest's sha256, and the gpu-python model refuses to load an engine
    replaced after generation, naming an IntegrityError, before TensorRT or CUDA is touched."""
    from google.protobuf import json_format

    from ftddm_trt.integrity import IntegrityError
    from ftddm_trt.serving.repository.render import TRITON_REPO_SRC
    from ftddm_trt.serving.repository.validate import parse_config

    export = _fake_export(tmp_path / "onnx", networks=tuple(TRITON_MODELS))
    engines = _fake_engines(tmp_path / "engines")
    (engines / "unet-abc.plan").write_bytes(b"placeholder plaN")
    for flavor in ("gpu", "gpu-python"):
        with pytest.raises(IntegrityError, match="unet network"):
            build_repository(export, tmp_path / f"bad-{flavor}", flavor, engines_dir=engines, log=_quiet)
        assert not (tmp_path / f"bad-{flavor}").exists()
    (engines / "unet-abc.plan").write_bytes(b"placeholder plan")
    out = tmp_path / "repo"
    build_repository(export, out, "gpu-python", engines_dir=engines, log=_quiet)

    fake = types.ModuleType("triton_python_backend_utils")

    class TritonModelException(Exception):
        pass

    fake.TritonModelException = TritonModelException
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it would fail: the check must come first
    spec = importlib.util.spec_from_file_location(
        "ftddm_tensorrt_network_model", TRITON_REPO_SRC / "python" / "tensorrt_network.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model_dir = out / "ftddm_unet"
    cfg = json_format.MessageToDict(
        parse_config((model_dir / "config.pbtxt").read_text()), preserving_proto_field_name=True
    )
    args = {"model_config": json.dumps(cfg), "model_repository": str(model_dir), "model_version": "1"}
    with pytest.raises(ImportError):  # intact: the hash passes, then TensorRT is needed
        mod.TritonPythonModel().initialize(args)
    plan = model_dir / "1" / "model.plan"
    plan.unlink()  # a hard link into the engine folder: replace it, don't edit in place
    plan.write_bytes(b"placeholder plaN")
    with pytest.raises(TritonModelException, match="IntegrityError"):
        mod.TritonPythonModel().initialize(args)


def test_gpu_python_configs_are_checked():
    ins, outs = default_network_io("unet")
    from ftddm_trt.serving.repository.render import network_config

    text = network_config("unet", "gpu-python", ins, outs, RepoOptions())
    validate_config(text, "gpu-python")
    with pytest.raises(ConfigError, match="KIND_CPU not allowed"):
        validate_config(text.replace("KIND_GPU", "KIND_CPU"), "gpu-python")
    with pytest.raises(ConfigError, match="gpu-python network must be backend"):
        validate_config(text.replace('backend: "python"', 'platform: "tensorrt_plan"'), "gpu-python")


def test_onnxruntime_tensorrt_accelerator_has_cache_path_and_profiles(tmp_path):
    export = _fake_export(tmp_path / "onnx", networks=tuple(TRITON_MODELS))
    out = tmp_path / "repo"
    build_repository(
        export, out, "gpu", options=RepoOptions(max_batch_size=32, preferred_batch_sizes=(8, 16)), log=_quiet
    )
    configs = validate_repository(out)
    acc = configs["ftddm_unet"].optimization.execution_accelerators.gpu_execution_accelerator[0]
    p = dict(acc.parameters)
    assert p["trt_engine_cache_enable"] == "1" and p["trt_engine_cache_path"].endswith("/ftddm_unet")
    assert p["trt_profile_min_shapes"] == "x_t:1x1x64x64,y:1x4x64x64,t:1,s:1"
    assert p["trt_profile_opt_shapes"] == "x_t:16x1x64x64,y:16x4x64x64,t:16,s:16"
    assert p["trt_profile_max_shapes"] == "x_t:32x1x64x64,y:32x4x64x64,t:32,s:32"
    flow = dict(configs["ftddm_flow"].optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert flow["trt_profile_max_shapes"] == "eps:32x1x64x64,y:32x4x64x64,tau_f:32"


def test_profile_shapes_default_opt():
    ins, _ = default_network_io("flow")
    shapes = profile_shapes(ins, RepoOptions(max_batch_size=8))
    assert shapes["opt"] == "eps:4x1x64x64,y:4x4x64x64,tau_f:4"


def test_cli_gpu_python_needs_engines(tmp_path):
    from ftddm_trt.cli.main import app

    export = _fake_export(tmp_path / "onnx", networks=tuple(TRITON_MODELS))
    res = CliRunner().invoke(
        app, ["triton-repo", "--flavor", "gpu-python", "--onnx", str(export), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "--engines" in res.output and not (tmp_path / "r").exists()
    res = CliRunner().invoke(
        app,
        [
            "triton-repo",
            "--flavor",
            "gpu-python",
            "--onnx",
            str(export),
            "--out",
            str(tmp_path / "r"),
            "--engines",
            str(_fake_engines(tmp_path / "e")),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "repository.json").read_text())["flavor"] == "gpu-python"


def test_batching_helpers():
    a = {"x": np.ones((2, 1, 4, 4), np.float32), "t": np.array([[1.0], [2.0]], np.float32)}
    b = {"x": np.zeros((3, 1, 4, 4), np.float32), "t": np.array([[3.0], [4.0], [5.0]], np.float32)}
    feeds = [{k: as_graph_rank(v, 1 if k == "t" else 4) for k, v in f.items()} for f in (a, b)]
    assert feeds[0]["t"].shape == (2,)
    merged, offsets = merge(feeds)
    assert (
        merged["x"].shape == (5, 1, 4, 4) and merged["t"].tolist() == [1, 2, 3, 4, 5] and offsets.tolist() == [0, 2, 5]
    )
    parts = split({"eps": merged["x"] * 2}, offsets)
    assert (
        [p["eps"].shape[0] for p in parts] == [2, 3] and (parts[0]["eps"] == 2).all() and (parts[1]["eps"] == 0).all()
    )
    with pytest.raises(ValueError, match="batch size"):
        merge([{"x": np.ones((2, 1)), "t": np.ones(3)}])
    with pytest.raises(ValueError, match="different tensors"):
        merge([{"x": np.ones((1, 1))}, {"y": np.ones((1, 1))}])
