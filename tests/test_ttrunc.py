"""The flow's Ttrunc is recorded in every manifest and a mismatch is refused by name everywhere:
in-process backends, the ONNX export, engines, Triton repositories and the server loop.

The Ttrunc = 100 export used here is the tiny export with its manifest saying ``flow_ttrunc: 100``, which is
what ``export_model_set`` writes for a model whose flow records Ttrunc = 100 (checked separately)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.engine.pipeline import SamplerSpec, require_flow_ttrunc, sample_images
from ftddm_trt.engine.triton_backend import decode_ttrunc_param, encode_sampler_settings, encode_ttrunc_param
from ftddm_trt.export.manifest import (
    FLOW_TTRUNC_KEY,
    TtruncMismatch,
    check_flow_ttrunc,
    manifest_flow_ttrunc,
    read_manifest,
    resolve_flow_ttrunc,
    write_manifest,
)
from ftddm_trt.serving.bls import BLSBackend, run_sampler
from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import ConfigError
from ftddm_trt.serving.repository.validate import validate_repository

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


def flat(text: str) -> str:
    return "".join(text.split())


def _quiet(_m: str) -> None:
    pass


@pytest.fixture(scope="module")
def export_t100(tiny_onnx_export, tmp_path_factory):
    """The tiny export, recorded as a flow trained for Ttrunc = 100."""
    out = tmp_path_factory.mktemp("t100") / "onnx"
    shutil.copytree(tiny_onnx_export, out)
    manifest = read_manifest(out)
    manifest[FLOW_TTRUNC_KEY] = 100
    write_manifest(out, manifest)
    return out


# -- pure logic --------------------------------------------------------------------------------------
def test_check_and_resolve():
    check_flow_ttrunc(None, 50, "x")  # unrecorded: accepted
    check_flow_ttrunc(100, 100, "x")
    with pytest.raises(TtruncMismatch, match=r"trained for Ttrunc = 100, not Ttrunc = 50"):
        check_flow_ttrunc(100, 50, "the export E")
    assert resolve_flow_ttrunc(100, None, "x") == 100
    assert resolve_flow_ttrunc(None, 50, "x") == 50
    assert resolve_flow_ttrunc(None, None, "x") is None
    with pytest.raises(TtruncMismatch, match="Ttrunc"):
        resolve_flow_ttrunc(100, 20, "x")


def test_manifest_without_the_key_is_refused_only_when_it_has_a_flow():
    assert manifest_flow_ttrunc({"networks": {"unet": {}}}, "m") is None
    assert manifest_flow_ttrunc({FLOW_TTRUNC_KEY: None, "networks": {"flow": {}}}, "m") is None
    assert manifest_flow_ttrunc({FLOW_TTRUNC_KEY: 20, "networks": {"flow": {}}}, "m") == 20
    with pytest.raises(TtruncMismatch, match="does not record the Ttrunc"):
        manifest_flow_ttrunc({"networks": {"flow": {}}}, "m")


def test_ttrunc_param_round_trip():
    for v in (None, 20, 100):
        assert decode_ttrunc_param({"flow_ttrunc": encode_ttrunc_param(v)}, "m") == v
    with pytest.raises(TtruncMismatch, match="regenerate"):
        decode_ttrunc_param({"network": "flow"}, "m")


class _Recorded(Backend):
    name = "recorded"

    def __init__(self, ttrunc):
        self._t = ttrunc
        self.calls = 0

    @property
    def flow_ttrunc(self):
        return self._t

    def unet(self, x_t, y, t, s, full=False):
        self.calls += 1
        return 0.1 * x_t

    def flow_reverse(self, eps, y, tau_f):
        self.calls += 1
        return eps


def test_the_pipeline_refuses_before_any_network_call():
    b = _Recorded(100)
    y, s = torch.zeros(2, 4, 64, 64), torch.full((2,), 4.0)
    for name in ("ftddm", "ftddm-dpmpp", "flow"):
        with pytest.raises(TtruncMismatch, match="Ttrunc = 100, not Ttrunc = 50"):
            sample_images(b, SamplerSpec(name, ttrunc=50, steps=2 if name == "ftddm-dpmpp" else None), y, s)
        with pytest.raises(TtruncMismatch):  # also with a server-side batch sampler
            sample_images(b, SamplerSpec(name, ttrunc=50, steps=2 if name == "ftddm-dpmpp" else None), y, s,
                          batch_sampler=lambda *a: pytest.fail("must not be called"))
    assert b.calls == 0
    require_flow_ttrunc(b, SamplerSpec("ddpm-respaced", ttrunc=50, steps=3))  # no flow: any Ttrunc
    require_flow_ttrunc(b, SamplerSpec("ftddm", ttrunc=100))
    require_flow_ttrunc(_Recorded(None), SamplerSpec("ftddm", ttrunc=7))


# -- manifests ---------------------------------------------------------------------------------------
def test_the_export_manifest_records_the_ttrunc(tiny_onnx_export, export_t100):
    assert FLOW_TTRUNC_KEY in read_manifest(tiny_onnx_export)  # tiny model records none: null
    assert read_manifest(tiny_onnx_export)[FLOW_TTRUNC_KEY] is None
    ort = OnnxRuntimeBackend(export_t100, threads=1)
    assert ort.flow_ttrunc == 100
    with pytest.raises(TtruncMismatch, match="Ttrunc"):
        require_flow_ttrunc(ort, SamplerSpec("ftddm", ttrunc=50))


def test_export_model_set_writes_the_models_ttrunc_and_refuses_another(tiny_model_dir, tmp_path, monkeypatch):
    """The manifest composition, with the (slow, separately tested) graph export replaced."""
    from ftddm_trt.export import onnx_export
    from ftddm_trt.models.model_set import ModelSet

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "manifest.json").write_text(json.dumps({"networks": {"flow": {"train_config": {"t_trunc": 100}}}}))
    monkeypatch.setattr(onnx_export, "export_network", lambda name, net, path: Path(path).write_bytes(b"onnx"))
    monkeypatch.setattr(onnx_export, "parity_check", lambda *a, **k: {"max_abs_error": 0.0, "atol": 1.0, "cases": {}})
    monkeypatch.setattr(onnx_export, "real_parity_inputs", lambda name: [])
    monkeypatch.setattr(onnx_export, "graph_io", lambda m: {"inputs": [], "outputs": []})
    monkeypatch.setattr(onnx_export.onnx, "load", lambda p: None)
    m = onnx_export.export_model_set(ModelSet.open(model), tmp_path / "e1", log=_quiet)
    assert m[FLOW_TTRUNC_KEY] == 100 and read_manifest(tmp_path / "e1")[FLOW_TTRUNC_KEY] == 100
    with pytest.raises(TtruncMismatch, match="Ttrunc"):
        onnx_export.export_model_set(ModelSet.open(model), tmp_path / "e2", log=_quiet, flow_ttrunc=50)
    assert not (tmp_path / "e2").exists()
    m = onnx_export.export_model_set(ModelSet.open(tiny_model_dir), tmp_path / "e3", log=_quiet, flow_ttrunc=20)
    assert m[FLOW_TTRUNC_KEY] == 20  # a model that records none: the --ttrunc given


# -- CLI refusals: nothing written -------------------------------------------------------------------
def test_upscale_onnx_refuses_another_ttrunc(export_t100, phantom_subject_dir, tmp_path):
    out = tmp_path / "out"
    for sampler in (["--sampler", "ftddm"], ["--sampler", "ftddm-dpmpp", "--steps", "2"]):
        res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--onnx", str(export_t100),
                                  "--ttrunc", "50", *sampler])
        assert res.exit_code != 0
        assert "trainedforTtrunc=100,notTtrunc=50" in flat(res.output)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no staging folder left behind


def test_upscale_onnx_refuses_an_export_that_predates_the_record(export_t100, phantom_subject_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(export_t100, old)
    manifest = read_manifest(old)
    del manifest[FLOW_TTRUNC_KEY]
    write_manifest(old, manifest)
    out = tmp_path / "out"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--onnx", str(old),
                              "--ttrunc", "100", "--sampler", "ftddm-dpmpp", "--steps", "2"])
    assert res.exit_code != 0 and "doesnotrecordtheTtrunc" in flat(res.output) and not out.exists()


def test_upscale_onnx_accepts_the_matching_ttrunc(export_t100, tiny_model_dir, phantom_subject_dir, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "upscale",
            str(phantom_subject_dir),
            "--out", str(out),
            "--onnx",
            str(export_t100),
            "--ttrunc",
            "100",
            "--model",
            str(tiny_model_dir),
            "--sampler",
            "ftddm-dpmpp",
            "--steps",
            "2",
            "--metabolites",
            "NAA",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["sampler"]["ttrunc"] == 100


def test_export_cli_refuses_a_ttrunc_the_model_has_no_flow_for(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "manifest.json").write_text(json.dumps({"networks": {"flow": {"train_config": {"t_trunc": 100}}}}))
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "e"), "--model", str(model), "--ttrunc", "50"])
    assert res.exit_code != 0 and "Ttrunc=50" in flat(res.output) and not (tmp_path / "e").exists()


def test_build_engine_refuses_another_ttrunc_before_looking_for_a_gpu(export_t100, tmp_path):
    res = runner.invoke(
        app, ["build-engine", "--onnx", str(export_t100), "--out", str(tmp_path / "eng"), "--ttrunc", "50"]
    )
    assert res.exit_code not in (0, 3), res.output  # 3 is "no GPU": the Ttrunc is checked first
    assert "Ttrunc=100,notTtrunc=50" in flat(res.output) and not (tmp_path / "eng").exists()


def test_tensorrt_backend_reads_and_checks_the_engine_manifest(tmp_path):
    from ftddm_trt.engine.tensorrt_backend import TensorRTBackend

    b = TensorRTBackend.__new__(TensorRTBackend)  # no GPU here: only the manifest logic
    b.root, b.manifest = tmp_path, {FLOW_TTRUNC_KEY: 100, "networks": {"flow": {}}}
    assert b.flow_ttrunc == 100
    with pytest.raises(TtruncMismatch, match=r"TensorRT engine folder .* Ttrunc = 100, not Ttrunc = 50"):
        require_flow_ttrunc(b, SamplerSpec("ftddm", ttrunc=50))
    b.manifest = {"networks": {"flow": {}}}
    with pytest.raises(TtruncMismatch, match="does not record"):
        require_flow_ttrunc(b, SamplerSpec("ftddm", ttrunc=100))


# -- Triton repository and the server loop -----------------------------------------------------------
def test_repository_records_the_ttrunc_in_flow_and_sampler_configs(export_t100, tmp_path):
    meta = build_repository(export_t100, tmp_path / "r", "cpu", log=_quiet)
    assert meta[FLOW_TTRUNC_KEY] == 100
    configs = validate_repository(tmp_path / "r")
    for model in ("ftddm_flow", "ftddm_sampler"):
        assert configs[model].parameters["flow_ttrunc"].string_value == "100"
    with pytest.raises(TtruncMismatch, match="Ttrunc"):
        build_repository(export_t100, tmp_path / "r2", "cpu", log=_quiet, flow_ttrunc=50)
    assert not (tmp_path / "r2").exists()
    cfg = tmp_path / "r" / "ftddm_sampler" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('string_value: "100"', 'string_value: "50"'))
    with pytest.raises(ConfigError, match="Ttrunc differs"):
        validate_repository(tmp_path / "r")


def test_triton_repo_cli_refuses_another_ttrunc(export_t100, tmp_path):
    res = runner.invoke(
        app, ["triton-repo", "--onnx", str(export_t100), "--out", str(tmp_path / "r"), "--ttrunc", "50"]
    )
    assert res.exit_code != 0 and "Ttrunc=100,notTtrunc=50" in flat(res.output) and not (tmp_path / "r").exists()


def test_server_loop_refuses_another_ttrunc_before_any_bls_request():
    calls = []

    def infer(model, inputs, outputs):
        calls.append(model)
        b = next(iter(inputs.values())).shape[0]
        return {o: np.zeros((b, 1, 64, 64), np.float32) for o in outputs}

    backend = BLSBackend(infer, flow_ttrunc=100)
    y, s = np.zeros((2, 4, 64, 64), np.float32), np.full((2, 1), 4.0, np.float32)
    with pytest.raises(TtruncMismatch, match="Ttrunc = 100, not Ttrunc = 50"):
        run_sampler(backend, y, s, encode_sampler_settings(SamplerSpec("ftddm", ttrunc=50), 0))
    assert calls == []
    x0, nfe = run_sampler(backend, y, s, encode_sampler_settings(SamplerSpec("ftddm-dpmpp", ttrunc=100, steps=2), 0))
    assert nfe == 3 and x0.shape == (2, 1, 64, 64) and len(calls) == 3
