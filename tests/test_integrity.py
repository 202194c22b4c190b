"""Integrity end to end: files are checked against their manifest hash before they run, outputs are
checked for non-finite values before anything is written, temperatures are bounded (issue 12)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.engine.pipeline import SamplerSpec
from ftddm_trt.integrity import IntegrityError, NonFiniteOutputError, check_temperature, file_sha256, verify_file

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2"]


def flip_byte(path: Path, offset_from_end: int = 200) -> None:
    """Flip one bit of a weight byte near the end of the file (inside the initializers)."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def flat(text: str) -> str:
    return "".join(text.split())


# ------------------------------------------------------------------------------------------- unit
def test_verify_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    assert verify_file(f, good) == good == file_sha256(f)
    with pytest.raises(IntegrityError, match="corrupt or was replaced"):
        verify_file(f, "0" * 64)
    with pytest.raises(IntegrityError, match="no sha256"):
        verify_file(f, None)
    with pytest.raises(FileNotFoundError):
        verify_file(tmp_path / "absent", good)


@pytest.mark.parametrize("value,ok", [(0.0, True), (0.9, True), (2.0, True), (-0.1, False), (2.01, False),
                                      (1e30, False), (float("nan"), False), (float("inf"), False)])
def test_temperature_bounds(value, ok):
    if ok:
        check_temperature("--tau-f", value)
    else:
        with pytest.raises(ValueError, match=r"--tau-f must be in \[0, 2\]"):
            check_temperature("--tau-f", value)


def test_ort_backend_refuses_a_flipped_bit(tiny_onnx_export, tmp_path):
    export = shutil.copytree(tiny_onnx_export, tmp_path / "onnx")
    with OnnxRuntimeBackend(export) as b:  # intact: opens, records the hash of the file that runs
        assert b.describe()["onnx"]["unet"] == file_sha256(export / "unet.onnx")
    flip_byte(export / "unet.onnx")
    with pytest.raises(IntegrityError, match="unet network .*unet.onnx is corrupt"):
        OnnxRuntimeBackend(export)


class _NaNBackend(Backend):
    """A backend whose networks answer NaN (what flipped exponent bits do)."""

    name = "nan"

    def unet(self, x_t, y, t, s, full: bool = False):
        return torch.full_like(x_t, float("nan"))

    def flow_reverse(self, eps, y, tau_f):
        return torch.full_like(eps, float("nan"))


def test_upscale_subject_refuses_nan(phantom_subject_dir):
    from ftddm_trt.data.nifti.read import read_subject
    from ftddm_trt.engine.upscale import upscale_subject

    subject = read_subject(phantom_subject_dir)
    subject.select(subject.metabolites[:1])
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        upscale_subject(subject, _NaNBackend(), SamplerSpec("ftddm-dpmpp", ttrunc=20, steps=2))


# --------------------------------------------------------------------------------------- CLI level
def _cache_with(tiny_model_dir, tiny_onnx_export, cache: Path) -> Path:
    """Put the tiny export where onnx_export_for looks for the tiny model's cached export."""
    from ftddm_trt.models.model_set import ModelSet

    models = ModelSet.open(tiny_model_dir)
    key = hashlib.sha256("".join(f"{k}={v}" for k, v in sorted(models.hashes().items())).encode()).hexdigest()[:16]
    folder = cache / "onnx" / key
    shutil.copytree(tiny_onnx_export, folder)
    return folder


def test_corrupt_cached_unet_is_refused_and_nothing_written(tiny_model_dir, tiny_onnx_export, phantom_subject_dir,
                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("FTDDM_TRT_CACHE", str(tmp_path / "cache"))
    cached = _cache_with(tiny_model_dir, tiny_onnx_export, tmp_path / "cache")
    out = tmp_path / "sr"
    args = [
        "upscale",
        str(phantom_subject_dir),
        "--out", str(out),
        *FAST,
        "--model",
        str(tiny_model_dir),
        "--metabolites",
        "NAA",
    ]
    res = runner.invoke(app, args)  # the cache is used (no export): it runs
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["backend"]["onnx"]["unet"] == file_sha256(cached / "unet.onnx")
    shutil.rmtree(out)

    flip_byte(cached / "unet.onnx")
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert "IntegrityError" in res.output and "unet.onnx" in flat(res.output)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sr")] == []


def test_corrupt_export_folder_is_refused(tiny_onnx_export, phantom_subject_dir, tmp_path):
    export = shutil.copytree(tiny_onnx_export, tmp_path / "onnx")
    flip_byte(export / "flow.onnx")
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, "--onnx", str(export)])
    assert res.exit_code != 0 and "IntegrityError" in res.output and "flow.onnx" in flat(res.output)
    assert not out.exists()


def test_nan_weights_give_a_named_refusal_and_nothing_written(tiny_model_dir, phantom_subject_dir, tmp_path):
    from ftddm_trt.models.io import load_config, load_model, save_model

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    net, cfg = load_model(model / "unet"), load_config(model / "unet")
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    save_model(net, cfg, model / "unet")
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, "--backend", "torch",
                              "--model", str(model), "--metabolites", "NAA"])
    assert res.exit_code != 0 and "NonFiniteOutputError" in res.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sr")] == []


@pytest.mark.parametrize("option,value", [("--tau-f", "1e30"), ("--tau-d", "-1"), ("--tau-f", "nan")])
def test_cli_bounds_temperatures(phantom_subject_dir, tmp_path, option, value):
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, option, value])
    assert res.exit_code == 2 and f"{option} must be in [0, 2]" in res.output
    assert not out.exists()


# ---------------------------------------------------------------------- Triton model code at load
def _load_model_code(monkeypatch):
    """The cpu-flavour model.py with a stand-in for Triton's triton_python_backend_utils."""
    fake = types.ModuleType("triton_python_backend_utils")

    class TritonModelException(Exception):
        pass

    fake.TritonModelException = TritonModelException
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    from ftddm_trt.serving.repository.render import TRITON_REPO_SRC

    spec = importlib.util.spec_from_file_location(
        "ftddm_onnx_network_model", TRITON_REPO_SRC / "python" / "onnx_network.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, TritonModelException


def test_triton_model_refuses_corrupt_model_onnx_at_load(tiny_onnx_export, tmp_path, monkeypatch):
    from ftddm_trt.serving.repository.build import build_repository

    repo = tmp_path / "repo"
    build_repository(tiny_onnx_export, repo, "cpu", log=lambda _m: None)
    mod, exc = _load_model_code(monkeypatch)
    model_dir = repo / "ftddm_unet"
    from google.protobuf import json_format

    from ftddm_trt.serving.repository.validate import parse_config

    cfg = json_format.MessageToDict(
        parse_config((model_dir / "config.pbtxt").read_text()), preserving_proto_field_name=True
    )
    args = {"model_config": json.dumps(cfg), "model_repository": str(model_dir), "model_version": "1"}
    model = mod.TritonPythonModel()
    model.initialize(args)  # intact: loads
    assert model.onnx_sha256 == file_sha256(model_dir / "1" / "model.onnx")

    onnx_file = model_dir / "1" / "model.onnx"
    data = onnx_file.read_bytes()  # model.onnx is a hard link into the export: replace, don't edit in place
    onnx_file.unlink()
    onnx_file.write_bytes(data)
    flip_byte(onnx_file)
    with pytest.raises(exc, match="IntegrityError"):
        mod.TritonPythonModel().initialize(args)


@pytest.mark.e2e
def test_triton_server_refuses_corrupt_model_onnx(tiny_onnx_export, tmp_path):
    """A real tritonserver on a repository whose ftddm_flow/1/model.onnx lost a bit: the start fails,
    naming the IntegrityError (the model refuses to load); nothing of the server is left running."""
    from ftddm_trt.serving.launcher import TritonServer, TritonServerError, shm_regions
    from ftddm_trt.serving.repository.build import build_repository
    from ftddm_trt.serving.repository.render import RepoOptions

    repo = tmp_path / "repo"
    build_repository(tiny_onnx_export, repo, "cpu", options=RepoOptions(sampler=False), log=lambda _m: None)
    for name in ("ftddm_unet", "ftddm_unet_full"):  # keep it cheap: one Python model to load
        shutil.rmtree(repo / name)
    onnx_file = repo / "ftddm_flow" / "1" / "model.onnx"
    data = onnx_file.read_bytes()
    onnx_file.unlink()
    onnx_file.write_bytes(data)
    flip_byte(onnx_file)
    server = TritonServer(repo, startup_timeout_s=120)
    with pytest.raises(TritonServerError, match="refusing to start.*IntegrityError.*ftddm_flow network file"):
        server.start()  # the launcher checks repository.json's hashes first: nothing is launched
    assert server.process is None
    # a file whose changed hash was also written into repository.json: the model's own check refuses it at load
    meta = json.loads((repo / "repository.json").read_text())
    meta["files"]["ftddm_flow"]["sha256"] = file_sha256(onnx_file)
    (repo / "repository.json").write_text(json.dumps(meta))
    server = TritonServer(repo, startup_timeout_s=120)
    with pytest.raises(TritonServerError) as info:
        server.start()
    assert "IntegrityError" in str(info.value) + server.log_tail()
    assert not server.is_running() and shm_regions(server.shm_prefix) == []


def test_gpu_repository_network_files_are_verified_before_a_start(tiny_onnx_export, tmp_path):
    """Triton's onnxruntime / tensorrt backends load the gpu flavour's files unchecked: the launcher hashes
    them against repository.json first and refuses (naming the file) a changed file, an unrecorded one,
    or a folder triton-repo did not write; nothing is launched (no GPU needed)."""
    from ftddm_trt.serving.launcher import TritonServer, TritonServerError
    from ftddm_trt.serving.repository.build import build_repository
    from ftddm_trt.serving.repository.validate import verify_repository_files

    repo = tmp_path / "gpu"
    build_repository(tiny_onnx_export, repo, "gpu", log=lambda _m: None)
    hashes = verify_repository_files(repo)
    assert set(hashes) == {"ftddm_unet", "ftddm_unet_full", "ftddm_flow"}
    ok = CliRunner().invoke(app, ["verify-repo", "--repo", str(repo)])
    assert ok.exit_code == 0 and "3 network files" in ok.output, ok.output
    assert hashes["ftddm_unet"] == file_sha256(tiny_onnx_export / "unet.onnx")  # the exported file, placed as is
    with pytest.raises(TritonServerError, match="only the Python backend"):
        TritonServer(repo).start()  # intact: past the hash check, then the bundled server's own refusal
    target = repo / "ftddm_unet" / "1" / "model.onnx"
    data = target.read_bytes()
    target.unlink()  # the placed file is a hard link to the export: never flip the export's bytes
    target.write_bytes(data)
    flip_byte(target)
    with pytest.raises(IntegrityError, match="ftddm_unet network file .*model.onnx is corrupt"):
        verify_repository_files(repo)
    bad = CliRunner().invoke(app, ["verify-repo", "--repo", str(repo)])
    assert bad.exit_code != 0 and "ftddm_unet" in bad.output and "corrupt" in bad.output
    assert verify_repository_files(repo, ["ftddm_flow", "ftddm_sampler"]).keys() == {
        "ftddm_flow"
    }  # only what is served
    server = TritonServer(repo)
    with pytest.raises(TritonServerError, match="refusing to start .*ftddm_unet network file"):
        server.start()
    assert server.process is None
    meta = json.loads((repo / "repository.json").read_text())
    del meta["files"]
    (repo / "repository.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="records no sha256 for ftddm_flow"):
        verify_repository_files(repo, ["ftddm_flow"])
    (repo / "repository.json").unlink()
    with pytest.raises(IntegrityError, match="no repository.json"):
        verify_repository_files(repo)
    # a corrupt export is refused while the repository is built (nothing recorded, no folder written)
    export = tmp_path / "export"
    shutil.copytree(tiny_onnx_export, export)
    flip_byte(export / "flow.onnx")
    with pytest.raises(IntegrityError, match="flow network .*flow.onnx|flow network .*model.onnx"):
        build_repository(export, tmp_path / "gpu2", "gpu", log=lambda _m: None)
    assert not (tmp_path / "gpu2").exists()


def test_engine_folder_is_reused_only_when_identical_and_intact(tmp_path):
    """build_engines' reuse check (pure logic, no GPU): same ONNX / GPU / TensorRT / precision / profile /
    Ttrunc and engines (and the fp16 graph the parser read) matching their recorded sha256, else rebuilt
    (None) or refused (IntegrityError)."""
    from dataclasses import asdict

    from ftddm_trt.export.manifest import write_manifest
    from ftddm_trt.export.tensorrt_build import build_options, engine_cache_key, same_build, volume_profile

    onnx_manifest = {"max_batch": 128, "networks": {"unet": {"onnx_sha256": "a" * 64}}}
    profile = volume_profile(16, 128)
    out = tmp_path / "engines"
    out.mkdir()
    (out / "unet.plan").write_bytes(b"engine bytes")
    (out / "unet.fp16.onnx").write_bytes(b"fp16 graph")
    key = engine_cache_key(file_sha256(out / "unet.fp16.onnx"), "10.9", "NVIDIA L4", "fp16", profile, build_options())
    write_manifest(out, {"flow_ttrunc": 100, "gpu": "NVIDIA L4", "tensorrt_version": "10.9", "precision": "fp16",
                         "profile": asdict(profile),
                         "networks": {"unet": {"engine": "unet.plan", "cache_key": key, "onnx_sha256": "a" * 64,
                                               "engine_sha256": file_sha256(out / "unet.plan"),
                                               "parsed_onnx": "unet.fp16.onnx",
                                               "parsed_onnx_sha256": file_sha256(out / "unet.fp16.onnx")}}})
    assert same_build(out, onnx_manifest, "NVIDIA L4", "10.9", 16, "fp16", 100) is not None
    assert same_build(out, onnx_manifest, "NVIDIA L4", "10.9", 16, "fp16", 250) is None  # another Ttrunc
    assert same_build(out, onnx_manifest, "NVIDIA L4", "10.9", 16, "fp16", 100, workspace_gib=8.0) is None
    assert same_build(out, onnx_manifest, "NVIDIA L4", "10.9", 16, "fp32", 100) is None
    assert same_build(out, onnx_manifest, "NVIDIA H100", "10.9", 16, "fp16", 100) is None
    assert (
        same_build(
            out,
            {**onnx_manifest, "networks": {"unet": {"onnx_sha256": "b" * 64}}},
            "NVIDIA L4",
            "10.9",
            16,
            "fp16",
            100,
        )
        is None
    )
    (out / "unet.fp16.onnx").write_bytes(b"fp16 grapH")
    with pytest.raises(IntegrityError, match="unet network"):
        same_build(out, onnx_manifest, "NVIDIA L4", "10.9", 16, "fp16", 100)
    (out / "unet.fp16.onnx").write_bytes(b"fp16 graph")
    (out / "unet.plan").write_bytes(b"engine bytez")
    with pytest.raises(IntegrityError, match="unet network"):
        same_build(out, onnx_manifest, "NVIDIA L4", "10.9", 16, "fp16", 100)
