"""One model end to end: every backend runs the networks of --model (default: the shipped model), or refuses
by network name with both hashes before anything is written; Triton's server loop checks them again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_model_set
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.engine.model_check import WEIGHTS_PARAM, ModelMismatch, check_same_model
from ftddm_trt.engine.pipeline import SamplerSpec
from ftddm_trt.engine.triton_backend import SAMPLER_MODEL, TritonBackend, TritonInferenceError, encode_sampler_settings
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.serving.bls import BLSBackend, run_sampler
from ftddm_trt.serving.launcher import TritonServer
from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import RepoOptions

runner = CliRunner()
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2", "--metabolites", "NAA"]


def flat(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A model folder whose networks differ from the tiny model's (same shapes, other weights)."""
    return build_tiny_model_set(tmp_path_factory.mktemp("other") / "model", seed=7)


def test_check_names_network_and_both_hashes():
    check_same_model(
        {"unet": "a", "flow": "b"}, {"unet": "a", "flow": "b", "unet_full": "z"}, ["unet", "flow"], "S", "M"
    )
    with pytest.raises(ModelMismatch) as err:
        check_same_model({"unet": "a", "flow": "b"}, {"unet": "x", "flow": "b"}, ["unet", "flow"], "the server", "M")
    msg = str(err.value)
    assert "unet:" in msg and "sha256 x" in msg and "sha256 a" in msg and "flow:" not in msg
    with pytest.raises(ModelMismatch, match="does not record"):
        check_same_model({"unet": "a"}, {}, ["unet"], "an old repository", "M")


def test_repository_records_the_weights(tiny_onnx_export, tiny_model_dir, tmp_path):
    from ftddm_trt.serving.repository.validate import parse_config

    build_repository(tiny_onnx_export, tmp_path / "repo", "cpu", log=lambda _m: None)
    hashes = ModelSet.open(tiny_model_dir).hashes()
    for net, model in (("unet", "ftddm_unet"), ("flow", "ftddm_flow")):
        cfg = parse_config((tmp_path / "repo" / model / "config.pbtxt").read_text())
        assert cfg.parameters[WEIGHTS_PARAM].string_value == hashes[net]
    sampler = parse_config((tmp_path / "repo" / SAMPLER_MODEL / "config.pbtxt").read_text())
    assert json.loads(sampler.parameters[WEIGHTS_PARAM].string_value) == hashes


def test_server_loop_refuses_other_weights():
    calls = []

    def infer(model, inputs, outputs):
        calls.append(model)
        return {outputs[0]: np.zeros_like(next(iter(inputs.values())))}

    bls = BLSBackend(infer, flow_ttrunc=None, weights={"unet": "a", "flow": "b"})
    y, s = np.zeros((1, 4, 64, 64), np.float32), np.full((1, 1), 4.0, np.float32)
    spec = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=2)
    with pytest.raises(ModelMismatch, match="unet"):
        run_sampler(bls, y, s, encode_sampler_settings(spec, 0, {"unet": "other", "flow": "b"}))
    assert calls == []  # refused before any network ran
    x0, nfe = run_sampler(bls, y, s, encode_sampler_settings(spec, 0, {"unet": "a", "flow": "b"}))
    assert x0.shape == (1, 1, 64, 64) and nfe == 3


def test_onnx_export_of_another_model_is_refused(tiny_onnx_export, tiny_model_dir, other_model, phantom_subject_dir,
                                                 tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--onnx", str(tiny_onnx_export),
                              "--model", str(other_model), *FAST])
    assert res.exit_code != 0
    want, got = ModelSet.open(other_model).hashes()["unet"], ModelSet.open(tiny_model_dir).hashes()["unet"]
    assert "refusingtomixtwomodels" in flat(res.output) and want in flat(res.output) and got in flat(res.output)
    assert not out.exists()


def _server_imports_this_checkout() -> bool:
    """Whether an isolated interpreter (as Triton's Python stub runs: PYTHONPATH ignored) imports this ftddm_trt."""
    import subprocess
    import sys
    from pathlib import Path

    import ftddm_trt

    out = subprocess.run([sys.executable, "-I", "-c", "import ftddm_trt; print(ftddm_trt.__file__)"],
                         capture_output=True, text=True)
    return out.returncode == 0 and Path(out.stdout.strip()).resolve() == Path(ftddm_trt.__file__).resolve()


@pytest.fixture(scope="module")
def served(tiny_onnx_export, tmp_path_factory):
    """A tritonserver serving the tiny model's networks (client loop only)."""
    root = tmp_path_factory.mktemp("served")
    build_repository(tiny_onnx_export, root / "repo", "cpu", options=RepoOptions(sampler=False), log=lambda _m: None)
    srv = TritonServer(root / "repo", startup_timeout_s=240,
                       log_path=root / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.e2e
def test_triton_refuses_another_model(served, tiny_model_dir, other_model, phantom_subject_dir, tmp_path):
    hashes, other = ModelSet.open(tiny_model_dir).hashes(), ModelSet.open(other_model).hashes()
    out = tmp_path / "out"
    for model in ([], ["--model", str(other_model)]):  # the shipped model by default, then another folder
        res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--backend", "triton",
                                  "--url", served.grpc_url, *model, *FAST])
        assert res.exit_code != 0
        text = flat(res.output)
        want = other["unet"] if model else ModelSet.open(None).hashes()["unet"]
        assert "refusingtomixtwomodels" in text and "unet:" in text and hashes["unet"] in text and want in text
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    with TritonBackend(served.grpc_url) as tb:
        assert tb.describe()["models"] == hashes


@pytest.mark.e2e
@pytest.mark.skipif(not _server_imports_this_checkout(),
                    reason="Triton's Python stub imports another ftddm_trt checkout than this one")
def test_server_loop_refuses_another_model(tiny_onnx_export, tiny_model_dir, other_model, tmp_path):
    repo = tmp_path / "repo"
    build_repository(tiny_onnx_export, repo, "cpu", log=lambda _m: None)
    served, other = ModelSet.open(tiny_model_dir).hashes(), ModelSet.open(other_model).hashes()
    srv = TritonServer(repo, models=["ftddm_unet", "ftddm_flow", SAMPLER_MODEL], startup_timeout_s=240,
                       log_path=tmp_path / "server.log")
    srv.start()
    try:
        g = torch.Generator().manual_seed(0)
        y, s = torch.rand(2, 4, 64, 64, generator=g), torch.tensor([4.0, 4.0])
        spec = SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=2)
        with TritonBackend(srv.grpc_url) as tb:
            tb.expect_weights({"unet": other["unet"], "flow": served["flow"]})  # past the client's own check
            with pytest.raises(TritonInferenceError, match="ModelMismatch"):
                tb.sample_on_server(y, s, spec, 0)
            tb.expect_weights({"unet": served["unet"], "flow": served["flow"]})
            assert tb.sample_on_server(y, s, spec, 0).x0.shape == (2, 1, 64, 64)
    finally:
        srv.stop()
