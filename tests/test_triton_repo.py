"""Triton repository generation and validation, launcher set-up, sampler protocol (no server, fast).

The export is faked (manifest + placeholder files): configs only read the manifest's tensor lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, sample_batch, sample_images
from ftddm_trt.engine.triton_backend import (
    SAMPLER_MODEL,
    TRITON_MODELS,
    batch_seed,
    decode_sampler_settings,
    encode_sampler_settings,
)
from ftddm_trt.serving import launcher, tritonserver
from ftddm_trt.serving.bls import BLSBackend, run_sampler
from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import ConfigError, RepoOptions
from ftddm_trt.serving.repository.validate import parse_config, validate_config, validate_repository

#: the placeholder files' real sha256, as an export's manifest records them (triton-repo checks each placed file)
SHA = {n: hashlib.sha256(b"placeholder onnx " + n.encode()).hexdigest() for n in TRITON_MODELS}


def _fake_export(folder: Path, networks=("unet", "unet_full", "flow")) -> Path:
    """A placeholder export with ``networks`` (default: the shipped model's; TRITON_MODELS adds the baselines)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = {"shape": ["batch", 1, 64, 64], "dtype": "float32"}
    cond = {"name": "y", "shape": ["batch", 4, 64, 64], "dtype": "float32"}

    def scalar(n):
        return {"name": n, "shape": ["batch"], "dtype": "float32"}

    unet = {"inputs": [{"name": "x_t", **img}, cond, scalar("t"), scalar("s")], "outputs": [{"name": "eps", **img}]}
    flow = {"inputs": [{"name": "eps", **img}, cond, scalar("tau_f")], "outputs": [{"name": "x", **img}]}
    munet = {"inputs": [cond, scalar("s")], "outputs": [{"name": "x0", **img}]}
    enhancer = {"inputs": [{"name": "eps", **img}, cond, {"name": "x_munet", **img}, scalar("tau_f")],
                "outputs": [{"name": "x", **img}]}
    io = {"flow": flow, "munet": munet, "flow_enhancer": enhancer}
    nets = {}
    for n in networks:
        (folder / f"{n}.onnx").write_bytes(b"placeholder onnx " + n.encode())
        nets[n] = {"onnx": f"{n}.onnx", "onnx_sha256": SHA[n], **io.get(n, unet)}
    (folder / "manifest.json").write_text(json.dumps({"max_batch": 128, "networks": nets, "model_hashes": {},
                                                      "flow_ttrunc": 100}))
    return folder


def _fake_engines(folder: Path, profile_max: int = 64, sha=SHA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nets = {}
    for n in TRITON_MODELS:
        (folder / f"{n}-abc.plan").write_bytes(b"placeholder plan")
        nets[n] = {"engine": f"{n}-abc.plan", "onnx_sha256": sha[n],
                   "engine_sha256": hashlib.sha256(b"placeholder plan").hexdigest()}
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "gpu": "X",
                "tensorrt_version": "10",
                "precision": "fp16",
                "flow_ttrunc": 100,
                "profile": {"min": 1, "opt": 16, "max": profile_max},
                "networks": nets,
            }
        )
    )
    return folder


@pytest.fixture()
def export_dir(tmp_path):
    return _fake_export(tmp_path / "onnx", networks=tuple(TRITON_MODELS))


def _quiet(_msg):
    pass


# -- generation ------------------------------------------------------------------------------------
def test_cpu_repository_is_valid(export_dir, tmp_path):
    out = tmp_path / "repo"
    meta = build_repository(export_dir, out, "cpu", log=_quiet)
    assert meta["models"] == ["ftddm_unet", "ftddm_unet_full", "ftddm_flow", "ftddm_munet", "ftddm_flow_enhancer",
                              SAMPLER_MODEL]
    configs = validate_repository(out)
    assert set(configs) == set(meta["models"])
    for name, cfg in configs.items():
        assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 32
        assert (out / name / "1" / "model.py").is_file()
    unet = configs["ftddm_unet"]
    assert [i.name for i in unet.input] == ["x_t", "y", "t", "s"]
    t = next(i for i in unet.input if i.name == "t")
    assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []
    assert list(unet.output[0].dims) == [1, 64, 64] and unet.output[0].name == "eps"
    assert unet.HasField("dynamic_batching") and unet.dynamic_batching.max_queue_delay_microseconds == 200
    assert unet.parameters["onnx_sha256"].string_value == SHA["unet"]
    assert (out / "ftddm_unet" / "1" / "model.onnx").read_bytes() == (export_dir / "unet.onnx").read_bytes()
    sampler = configs[SAMPLER_MODEL]
    assert not sampler.HasField("dynamic_batching")
    assert json.loads(sampler.parameters["models"].string_value) == TRITON_MODELS
    assert [o.name for o in sampler.output] == ["x0", "nfe"]
    assert json.loads((out / "repository.json").read_text())["flavor"] == "cpu"


def test_gpu_repository_onnxruntime_tensorrt_accelerator(export_dir, tmp_path):
    out = tmp_path / "repo"
    build_repository(
        export_dir, out, "gpu", options=RepoOptions(preferred_batch_sizes=(8, 16), instances=2), log=_quiet
    )
    configs = validate_repository(out)
    from tritonclient.grpc import model_config_pb2 as pb

    for n in TRITON_MODELS.values():
        cfg = configs[n]
        assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2
        assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP32"
        assert (out / n / "1" / "model.onnx").is_file() and not (out / n / "1" / "model.py").exists()
    assert configs[SAMPLER_MODEL].backend == "python"


def test_gpu_repository_with_engines(export_dir, tmp_path):
    out = tmp_path / "repo"
    engines = _fake_engines(tmp_path / "engines")
    build_repository(export_dir, out, "gpu", engines_dir=engines, log=_quiet)
    configs = validate_repository(out)
    for n in TRITON_MODELS.values():
        assert configs[n].platform == "tensorrt_plan"
        assert (out / n / "1" / "model.plan").read_bytes() == b"placeholder plan"
    with pytest.raises(ConfigError, match="profile max 16"):
        build_repository(
            export_dir, tmp_path / "r2", "gpu", engines_dir=_fake_engines(tmp_path / "e2", profile_max=16), log=_quiet
        )
    stale = _fake_engines(tmp_path / "e3", sha={**SHA, "flow": "f" * 64})
    with pytest.raises(ConfigError, match="flow engine .* another ONNX file"):
        build_repository(export_dir, tmp_path / "r3", "gpu", engines_dir=stale, log=_quiet)
    with pytest.raises(ConfigError, match="gpu-flavour"):
        build_repository(export_dir, tmp_path / "r4", "cpu", engines_dir=engines, log=_quiet)


def test_repository_without_unet_full(tmp_path):
    exp = _fake_export(tmp_path / "onnx", networks=("unet", "flow"))
    meta = build_repository(exp, tmp_path / "repo", "cpu", log=_quiet)
    assert meta["models"] == ["ftddm_unet", "ftddm_flow", SAMPLER_MODEL]
    sampler = validate_repository(tmp_path / "repo")[SAMPLER_MODEL]
    assert json.loads(sampler.parameters["models"].string_value) == {"unet": "ftddm_unet", "flow": "ftddm_flow"}


def test_refuses_non_empty_output_and_bad_options(export_dir, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OSError, match="--force"):  # atomic.OutputError
        build_repository(export_dir, out, "cpu", log=_quiet)
    with pytest.raises(OSError, match="refusing --force: .* was not written by ftddm-trt"):  # a user's folder
        build_repository(export_dir, out, "cpu", force=True, log=_quiet)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    build_repository(export_dir, out, "cpu", log=_quiet)
    build_repository(export_dir, out, "cpu", force=True, log=_quiet)  # its own repository: replaced
    with pytest.raises(ConfigError, match="preferred batch sizes"):
        RepoOptions(max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        RepoOptions(max_batch_size=0)
    with pytest.raises(ConfigError, match="exceeds the export's dynamic batch max 128"):
        build_repository(export_dir, tmp_path / "r2", "cpu", options=RepoOptions(max_batch_size=256), log=_quiet)
    with pytest.raises(ConfigError, match="flavor"):
        build_repository(export_dir, tmp_path / "r3", "tpu", log=_quiet)
    # nothing half-written is left beside the output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- validation ------------------------------------------------------------------------------------
@pytest.fixture()
def cpu_texts(export_dir, tmp_path):
    out = tmp_path / "repo"
    build_repository(export_dir, out, "cpu", log=_quiet)
    return {d.name: (d / "config.pbtxt").read_text() for d in out.iterdir() if d.is_dir()}


@pytest.mark.parametrize(
    "model, old, new, flavor, message",
    [
        ("ftddm_unet", 'name: "x_t"', 'name: "x"', "cpu", r"inputs .* do not match the export"),
        ("ftddm_unet", "max_batch_size: 32", "max_batch_size: 0", "cpu", "max_batch_size must be >= 1"),
        ("ftddm_unet", "dims: [ 4, 64, 64 ]", "dims: [ 4, 32, 32 ]", "cpu", r"input y has dims \[4, 32, 32\]"),
        ("ftddm_unet", "    reshape: { shape: [ ] }\n", "", "cpu", r"reshape: \{ shape: \[ \] \}"),
        (
            "ftddm_unet",
            "max_queue_delay_microseconds: 200",
            "preferred_batch_size: [ 64 ]\n  max_queue_delay_microseconds: 200",
            "cpu",
            r"preferred_batch_size \[64\] outside 1..max_batch_size=32",
        ),
        ("ftddm_unet", 'backend: "python"', 'platform: "onnxruntime_onnx"', "cpu", 'must be backend "python"'),
        ("ftddm_unet", 'backend: "python"', 'backend: "python"', "gpu", "gpu-flavour network must be platform"),
        ("ftddm_unet", "TYPE_FP32", "TYPE_FP16", "cpu", "data_type TYPE_FP16"),
        ("ftddm_unet", "kind: KIND_CPU", "kind: KIND_GPU", "cpu", "kind KIND_GPU not allowed"),
        ("ftddm_unet", "count: 1", "count: 0", "cpu", "count must be >= 1"),
        ("ftddm_unet", 'name: "ftddm_unet"', 'name: "resnet50"', "cpu", "unknown model 'resnet50'"),
        ("ftddm_flow", 'name: "tau_f"', 'name: "tau"', "cpu", r"inputs .* do not match"),
        (
            "ftddm_sampler",
            "instance_group",
            "dynamic_batching { }\ninstance_group",
            "cpu",
            "must not use dynamic batching",
        ),
        ("ftddm_sampler", 'name: "nfe"', 'name: "steps"', "cpu", r"outputs .* do not match"),
        ("ftddm_unet", "dims: [ 1, 64, 64 ]", "dims: [ 1, 64, 64 ", "cpu", "does not parse as a Triton ModelConfig"),
        ("ftddm_unet", "max_batch_size: 32", "max_batch_size: 32\nmax_batch_sise: 4", "cpu", "does not parse"),
        ("ftddm_unet", "data_type: TYPE_FP32", "data_type: FLOAT32", "cpu", "does not parse"),
    ],
)
def test_bad_configs_are_rejected(cpu_texts, model, old, new, flavor, message):
    text = cpu_texts[model]
    assert old in text
    validate_config(text, "cpu")  # the generated one passes
    with pytest.raises(ConfigError, match=message):
        validate_config(text.replace(old, new, 1), flavor)


def test_validate_config_against_manifest_and_folder_name(cpu_texts, export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    validate_config(cpu_texts["ftddm_unet"], "cpu", manifest, expected_name="ftddm_unet")
    with pytest.raises(ConfigError, match="its folder is 'ftddm_flow'"):
        validate_config(cpu_texts["ftddm_unet"], "cpu", manifest, expected_name="ftddm_flow")
    manifest["networks"]["unet"]["inputs"][0]["name"] = "x_noisy"
    with pytest.raises(ConfigError, match="x_noisy"):
        validate_config(cpu_texts["ftddm_unet"], "cpu", manifest)
    with pytest.raises(ConfigError, match="parse"):
        parse_config("name: ")


def test_validate_repository_catches_missing_files(export_dir, tmp_path):
    out = tmp_path / "repo"
    build_repository(export_dir, out, "cpu", log=_quiet)
    (out / "ftddm_flow" / "1" / "model.onnx").unlink()
    with pytest.raises(ConfigError, match="lacks model.onnx"):
        validate_repository(out)
    import shutil

    shutil.rmtree(out / "ftddm_flow")
    with pytest.raises(ConfigError, match="calls models that the repository lacks"):
        validate_repository(out)


# -- sampler protocol and the BLS backend ----------------------------------------------------------
@pytest.mark.parametrize("spec", [
    SamplerSpec("ftddm-dpmpp", ttrunc=73, steps=7, tau_d=0.85, tau_f=0.123456789),
    SamplerSpec("ftddm"),
    SamplerSpec("dpmpp", steps=30, clip_x0=None, lambda_min=-4.25),
    SamplerSpec("dpmpp", clip_x0=(-0.5, 2.25), lambda_min=None),
    SamplerSpec("ddpm-respaced", steps=13, clip_x0=(0.0, 1e-3), tau_d=0.0),
    SamplerSpec("dpmpp", steps=40, sde=True, tau_d=0.7),
    SamplerSpec("ftddm-dpmpp", steps=9, sde=True),
])
def test_sampler_settings_round_trip(spec):
    """One symmetric encoding: every field survives (clip_x0 and lambda_min included), through JSON."""
    back = SamplerSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.to_dict() == spec.to_dict()
    text = encode_sampler_settings(spec, batch_seed(12345, 3))
    back, seed = decode_sampler_settings(text)
    assert back == spec and seed == 12345 * 1_000_003 + 3
    assert json.loads(text)["clip_x0"] == (None if spec.clip_x0 is None else list(spec.clip_x0))


def test_sampler_settings_refused():
    assert decode_sampler_settings(encode_sampler_settings(SamplerSpec("ftddm"), 0))[0].steps is None
    assert SamplerSpec("dpmpp") == SamplerSpec("dpmpp", steps=20)  # a solver's default steps are resolved
    with pytest.raises(ValueError, match="unknown sampler settings"):
        decode_sampler_settings('{"name": "ftddm", "temperature": 1}')
    with pytest.raises(ValueError, match="not JSON"):
        decode_sampler_settings("sampler=ftddm")
    with pytest.raises(ValueError, match="unknown sampler"):
        decode_sampler_settings('{"name": "euler"}')
    with pytest.raises(ValueError, match="costs 21"):
        SamplerSpec.from_dict({"name": "ftddm-dpmpp", "nfe": 5})
    for bad in ({"clip_x0": [1, 2, 3]}, {"clip_x0": [2, 1]}, {"steps": 2.5, "name": "dpmpp"}, {"ttrunc": "x"},
                {"lambda_min": float("inf")}, {"name": "dpmpp", "sde": 1}, {"name": "dpmpp", "sde": "yes"},
                {"name": "ftddm", "sde": True}):
        with pytest.raises(ValueError):
            SamplerSpec.from_dict(bad)
    with pytest.raises(ValueError, match="DPM-Solver"):
        SamplerSpec("ddpm-respaced", sde=True)
    with pytest.raises(ValueError, match="seed"):
        decode_sampler_settings('{"name": "ftddm", "seed": 1.5}')
    with pytest.raises(ValueError, match="at most 995"):
        SamplerSpec("dpmpp", steps=996)  # lambda clipped at -5.1: the chain starts at t = 996


class _ToyBackend(Backend):
    """Cheap deterministic networks that use every input."""

    name = "toy"

    def unet(self, x_t, y, t, s, full=False):
        return (
            0.3 * x_t
            + 0.1 * y[:, :1] * (t / 1000.0).view(-1, 1, 1, 1)
            + 0.01 * s.view(-1, 1, 1, 1)
            + (0.05 if full else 0.0)
        )

    def flow_reverse(self, eps, y, tau_f):
        return y[:, :1] + tau_f.view(-1, 1, 1, 1) * 0.2 * eps


def _toy_infer(calls):
    """An ``infer`` callable answering like the Triton network models do (t, s, tau_f as (B, 1))."""
    toy = _ToyBackend()

    def infer(model, inputs, outputs):
        calls.append(model)
        for name in ("t", "s", "tau_f"):
            if name in inputs:
                assert inputs[name].shape == (inputs["y"].shape[0], 1)
        f = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        if model == "ftddm_flow":
            return {"x": toy.flow_reverse(f["eps"], f["y"], f["tau_f"].view(-1)).numpy()}
        full = model == "ftddm_unet_full"
        return {"eps": toy.unet(f["x_t"], f["y"], f["t"].view(-1), f["s"].view(-1), full).numpy()}

    return infer


@pytest.mark.parametrize(
    "spec",
    [
        SamplerSpec("ftddm", ttrunc=6),
        SamplerSpec("ftddm-dpmpp", ttrunc=40, steps=3),
        SamplerSpec("ddpm-respaced", steps=4),
        SamplerSpec("flow", tau_f=0.5),
        SamplerSpec("dpmpp", steps=3, clip_x0=None),
        SamplerSpec("dpmpp", steps=3, clip_x0=(0.0, 0.5)),
        SamplerSpec("dpmpp", steps=3, lambda_min=None),
    ],
)
def test_bls_sampler_equals_in_process_loop(spec):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 4, 64, 64, generator=g)
    y[:, 1] = (y[:, 1] > 0).float()
    s = torch.tensor([2.0, 4.0, 8.0, 3.2, 2.0])
    ref, nfe = sample_images(_ToyBackend(), spec, y, s, batch_size=3, seed=11)
    calls: list[str] = []
    bls = BLSBackend(_toy_infer(calls))
    outs = []
    for i, start in enumerate(range(0, 5, 3)):
        x0, n = run_sampler(
            bls,
            y[start : start + 3].numpy(),
            s[start : start + 3, None].numpy(),
            encode_sampler_settings(spec, batch_seed(11, i)),
        )
        assert x0.shape == (min(3, 5 - start), 1, 64, 64) and x0.dtype == np.float32 and n == nfe
        outs.append(torch.from_numpy(x0))
    torch.testing.assert_close(torch.cat(outs), ref, rtol=0, atol=0)
    assert len(calls) == 2 * nfe
    if spec.full_chain_unet:
        assert set(calls) == {"ftddm_unet_full"}
    # same seed, same first batch as sample_batch with the generator seeded by hand
    direct = sample_batch(_ToyBackend(), spec, y[:3], s[:3], torch.Generator().manual_seed(batch_seed(11, 0)))
    torch.testing.assert_close(outs[0], direct.x0, rtol=0, atol=0)


def test_server_loop_receives_clip_and_lambda():
    """The server loop runs the client's clip_x0 and lambda_min: changing either changes what it returns."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 4, 64, 64, generator=g)
    y[:, 1] = 1.0
    s = torch.tensor([4.0, 4.0])
    bls = BLSBackend(_toy_infer([]))

    def run(spec):
        return torch.from_numpy(run_sampler(bls, y.numpy(), s[:, None].numpy(), encode_sampler_settings(spec, 5))[0])

    plain = dict(steps=3, data_consistency=False)  # the solver's own output, not its k-space-corrected one
    base = run(SamplerSpec("dpmpp", **plain))
    assert float(base.max()) <= 3.0  # the default clip reached the solver's data predictions (the last step returns D)
    assert float(run(SamplerSpec("dpmpp", clip_x0=(0.0, 0.5), **plain)).max()) <= 0.5
    assert float(run(SamplerSpec("dpmpp", clip_x0=None, **plain)).abs().max()) > 3.0
    assert not torch.equal(run(SamplerSpec("dpmpp", lambda_min=None, **plain)), base)
    assert not torch.equal(run(SamplerSpec("dpmpp", steps=3)), base)  # data consistency travels to the server too


def test_run_sampler_rejects_bad_shapes():
    bls = BLSBackend(_toy_infer([]))
    with pytest.raises(ValueError, match=r"expected y \(B,4,H,W\)"):
        run_sampler(
            bls,
            np.zeros((2, 3, 64, 64), np.float32),
            np.ones(2, np.float32),
            encode_sampler_settings(SamplerSpec("flow"), 0),
        )


# -- launcher set-up (no server started) -----------------------------------------------------------
def test_bundled_server_environment_and_command(tmp_path, monkeypatch):
    monkeypatch.delenv(tritonserver.BINARY_ENV, raising=False)
    install = tritonserver.find_tritonserver(prefer_bundled=True)
    assert install.bundled and install.binary.is_file() and install.stub is not None
    assert install.stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = tritonserver.prepare_backend_dir(install, tmp_path / "backends")
    assert sorted(p.name for p in (backends / "python").iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    env = tritonserver.server_environment(install, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    ld = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld[0].endswith("nvidia_pytriton.libs") and ld[-1] == "/opt/x"
    import sysconfig

    assert sysconfig.get_config_var("LIBDIR") in ld
    cmd = tritonserver.server_command(install, tmp_path, backends, 1, 2, 3, "triton_python_backend_shm_region_x_")
    for flag in ("--model-repository=", "--backend-directory=", "--http-port=1", "--grpc-port=2", "--metrics-port=3",
                 "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
                 "--backend-config=python,shm-region-prefix-name=triton_python_backend_shm_region_x_"):
        assert any(c.startswith(flag) for c in cmd), flag
    with pytest.raises(tritonserver.TritonServerError, match="does not exist"):
        tritonserver.find_tritonserver(tmp_path / "nope")


def test_free_port_and_server_arguments(tmp_path):
    ports = {launcher.free_port() for _ in range(3)}
    assert all(1024 <= p < 65536 for p in ports)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
    server = launcher.TritonServer(tmp_path, 5000, 5001, 5002)
    assert server.models == ["m"] and server.grpc_url == "127.0.0.1:5001" and not server.is_running()
    assert re.fullmatch(r"triton_python_backend_shm_region_ftddm\d+x5001_", server.shm_prefix)
    assert server.stop() is None  # stopping a server never started is harmless
    with pytest.raises(launcher.TritonServerError, match="must differ"):
        launcher.TritonServer(tmp_path, 5000, 5000, 5002)
    with pytest.raises(launcher.TritonServerError, match="does not exist"):
        launcher.TritonServer(tmp_path / "missing")


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_triton_repo(export_dir, tmp_path):
    from ftddm_trt.cli.main import app

    runner = CliRunner()
    out = tmp_path / "repo"
    res = runner.invoke(
        app, ["triton-repo", "--flavor", "gpu", "--onnx", str(export_dir), "--out", str(out), "--max-batch-size", "16"]
    )
    assert res.exit_code == 0, res.output
    assert validate_repository(out)["ftddm_unet"].max_batch_size == 16
    res = runner.invoke(app, ["triton-repo", "--flavor", "gpu", "--onnx", str(export_dir), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(
        app,
        [
            "triton-repo",
            "--flavor",
            "cpu",
            "--onnx",
            str(export_dir),
            "--out",
            str(tmp_path / "r2"),
            "--engines",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 2 and "--flavor gpu" in res.output
    res = runner.invoke(
        app, ["triton-repo", "--flavor", "xpu", "--onnx", str(export_dir), "--out", str(tmp_path / "r3")]
    )
    assert res.exit_code == 2 and "--flavor must be one of" in res.output
    res = runner.invoke(app, ["serve", "--repo", str(tmp_path / "absent")])
    assert res.exit_code == 2 and "does not exist" in res.output
