"""End to end: a real tritonserver (nvidia-pytriton's bundled 2.51, Python backend) on loopback ports,
serving the cpu repository built from a real ONNX export of tiny networks.

Both Triton paths must give what ONNX Runtime gives in-process for the same seed and batch size:
the client loop (``sample_images`` over ``TritonBackend``) and the server loop (``ftddm_sampler``,
BLS). The same ONNX files run in both places, so the results agree to float rounding (summation
order can differ with thread counts or merged batches: atol 1e-4 on outputs of order 1-10).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
from ftddm_trt.engine.triton_backend import SAMPLER_MODEL, TritonBackend, TritonInferenceError, TritonUnavailable
from ftddm_trt.serving.launcher import TritonServer, free_port, shm_regions
from ftddm_trt.serving.repository.build import build_repository

pytestmark = pytest.mark.e2e
ATOL = 1e-4
SPECS = [
    SamplerSpec("ftddm", ttrunc=8),
    SamplerSpec("ftddm-dpmpp", ttrunc=60, steps=4),
    SamplerSpec("ddpm-respaced", steps=5),
]


@pytest.fixture(scope="module")
def cpu_repo(tiny_onnx_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    build_repository(tiny_onnx_export, out, "cpu", log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def server(cpu_repo):
    srv = TritonServer(cpu_repo, startup_timeout_s=240)
    srv.start()
    yield srv
    prefix = srv.shm_prefix
    srv.stop()
    assert not srv.is_running()
    assert shm_regions(prefix) == []
    assert srv._session_members() == []


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 4, 64, 64, generator=g)
    y[:, 1] = (y[:, 1] > -0.3).float()
    y[:, 2:] = y[:, 2:].abs().clamp(max=1)
    s = torch.tensor([2.0, 4.0, 8.0, 3.2, 2.0])
    return y, s


@pytest.fixture(scope="module")
def ort(tiny_onnx_export):
    with OnnxRuntimeBackend(tiny_onnx_export) as b:
        yield b


def test_server_is_up(server):
    assert server.is_running() and server.start_time_s is not None
    with TritonBackend(server.grpc_url, require=("unet", "unet_full", "flow")) as tb:
        info = tb.describe()
    assert info["server_version"] and set(info["onnx"]) == {"unet", "unet_full", "flow"}
    assert shm_regions(server.shm_prefix), "the Python backend should hold regions under this server's prefix"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_client_loop_matches_onnxruntime(server, ort, inputs, spec):
    y, s = inputs
    ref, nfe = sample_images(ort, spec, y, s, batch_size=3, seed=7)
    assert ref.abs().max() > 0.1  # a non-trivial result
    with TritonBackend(server.grpc_url) as tb:
        out, n = sample_images(tb, spec, y, s, batch_size=3, seed=7)
    assert n == nfe
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("protocol, shm", [("http", False), ("grpc", True), ("http", True)])
def test_client_loop_protocols_and_shared_memory(server, ort, inputs, protocol, shm):
    y, s = inputs
    spec = SPECS[1]
    ref, _ = sample_images(ort, spec, y, s, batch_size=2, seed=3)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    tb = TritonBackend(url, protocol=protocol, shared_memory=shm)
    try:
        out, _ = sample_images(tb, spec, y, s, batch_size=2, seed=3)
        keys = [r.key for r in tb._regions]
    finally:
        tb.close()
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    for key in keys:  # client regions are unlinked by close()
        assert not os.path.exists(f"/dev/shm{key}")


@pytest.mark.parametrize("spec", [*SPECS, SamplerSpec("flow", tau_f=0.0), SamplerSpec("dpmpp", steps=3, clip_x0=None),
                                  SamplerSpec("dpmpp", steps=3, clip_x0=(0.0, 0.25), lambda_min=-4.0)],
                         ids=lambda s: f"{s.name}-clip{s.clip_x0}-lambda{s.lambda_min}")
def test_server_loop_matches_onnxruntime(server, ort, inputs, spec):
    y, s = inputs
    ref, nfe = sample_images(ort, spec, y, s, batch_size=3, seed=7)
    with TritonBackend(server.grpc_url) as tb:
        out, n = tb.sample_images_on_server(spec, y, s, batch_size=3, seed=7)
    assert n == nfe
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_server_errors_are_clear(server, inputs):
    y, s = inputs
    with TritonBackend(server.grpc_url) as tb:
        with pytest.raises(TritonInferenceError, match="ftddm_sampler"):
            tb._infer(
                SAMPLER_MODEL,
                {"y": y[:1].numpy(), "s": s[:1, None].numpy()},
                {"x0": (1, 1, 64, 64), "nfe": (1, 1)},
                10.0,
                {"settings": '{"name": "euler"}'},
            )
        with pytest.raises(TritonInferenceError, match="ftddm_unet"):
            tb._infer("ftddm_unet", {"x_t": y[:1, :1].numpy()}, {"eps": (1, 1, 64, 64)}, 10.0)


def test_unreachable_and_missing_models(server):
    url = f"127.0.0.1:{free_port()}"
    for protocol in ("grpc", "http"):
        t0 = time.monotonic()
        with pytest.raises(TritonUnavailable, match=url):
            TritonBackend(url, protocol=protocol, retries=2, backoff_s=0.01)
        assert time.monotonic() - t0 < 20
    with pytest.raises(TritonUnavailable, match="does not serve model 'ftddm_nope'"):
        TritonBackend(server.grpc_url, models={"unet": "ftddm_nope", "flow": "ftddm_flow"})


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_killed_mid_run(cpu_repo, inputs, protocol, tmp_path):
    """The client's error names the URL when the server dies while a sampling loop runs."""
    y, s = inputs
    srv = TritonServer(cpu_repo, models=["ftddm_unet_full"], startup_timeout_s=240, log_path=tmp_path / "server.log")
    srv.start()
    try:
        prefix = srv.shm_prefix
        url = srv.grpc_url if protocol == "grpc" else srv.http_url
        tb = TritonBackend(url, protocol=protocol, require=("unet_full",), retries=2, backoff_s=0.05, timeout_s=20)
        done = threading.Event()

        def killer():
            time.sleep(1.0)
            srv.kill()
            done.set()

        threading.Thread(target=killer, daemon=True).start()
        with pytest.raises(TritonUnavailable, match=url):
            sample_images(tb, SamplerSpec("ddpm"), y, s, batch_size=5)  # 1000 NFE: outlives the kill
        assert done.wait(30)
        tb.close()
    finally:
        srv.stop()
    assert shm_regions(prefix) == [], "stop() removes the regions a killed server leaked"
    assert srv._session_members() == []


def test_failed_model_load_is_reported(cpu_repo, tmp_path):
    import shutil

    from ftddm_trt.serving.launcher import TritonServerError

    broken = tmp_path / "repo"
    shutil.copytree(cpu_repo, broken)
    (broken / "ftddm_flow" / "1" / "model.onnx").unlink()
    (broken / "ftddm_flow" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    _record_file_hash(broken, "ftddm_flow")  # past the launcher's hash check: the server itself must fail the load
    srv = TritonServer(broken, models=["ftddm_flow"], startup_timeout_s=240, log_path=tmp_path / "server.log")
    with pytest.raises(
        TritonServerError, match=r"(?s)exited with code 1 before it was ready.*failed to load 'ftddm_flow'"
    ):
        srv.start()
    assert not srv.is_running() and srv._session_members() == [] and shm_regions(srv.shm_prefix) == []
    gpu = tmp_path / "gpu"
    build_repository(_export_of(cpu_repo), gpu, "gpu", log=lambda _m: None)
    with pytest.raises(TritonServerError, match="only the Python backend"):
        TritonServer(gpu).start()


def _record_file_hash(repo, model):
    """Make repository.json record the current hash of ``model``'s network file (as if triton-repo had placed it)."""
    import json

    from ftddm_trt.integrity import file_sha256

    meta_path = repo / "repository.json"
    meta = json.loads(meta_path.read_text())
    info = meta["files"][model]
    info["sha256"] = file_sha256(repo / model / info["file"])
    meta_path.write_text(json.dumps(meta))


def _export_of(repo):
    import json

    return Path(json.loads((repo / "repository.json").read_text())["onnx_dir"])


def test_serve_cli_stops_cleanly_on_ctrl_c(cpu_repo, tmp_path):
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ftddm_trt.cli.main", "serve", "--repo", str(cpu_repo), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with TritonBackend(f"127.0.0.1:{ports[1]}", retries=0, require=("unet", "flow", "unet_full")):
                    ready = True
                    break
            except TritonUnavailable:
                time.sleep(0.3)
        assert ready, proc.stdout.read() if proc.poll() is not None else "server not ready"
        out = subprocess.run(["pgrep", "-s", str(_server_sid(proc.pid))], capture_output=True, text=True).stdout.split()
        assert out, "the server runs in its own session"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stopped" in output
    sid = int(out[0])
    assert subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).returncode == 1, "stray server processes"
    assert shm_regions(f"triton_python_backend_shm_region_ftddm{proc.pid}x") == []
    assert log.is_file() and "ftddm_sampler" in log.read_text()


def _server_sid(cli_pid: int) -> int:
    """The session of the tritonserver the CLI started (its child)."""
    kids = subprocess.run(["pgrep", "-P", str(cli_pid)], capture_output=True, text=True).stdout.split()
    for k in kids:
        if "tritonserver" in open(f"/proc/{k}/cmdline").read():
            return os.getsid(int(k))
    raise AssertionError(f"no tritonserver child of {cli_pid}")


def test_triton_refuses_another_ttrunc_in_both_loops(tiny_onnx_export, inputs, phantom_subject_dir, tmp_path):
    """A repository whose flow was trained for Ttrunc = 100: `upscale --ttrunc 50` is refused naming Ttrunc with
    nothing written (client loop and --server-loop), and ftddm_sampler itself refuses such a request."""
    import shutil

    from typer.testing import CliRunner

    from ftddm_trt.cli.main import app
    from ftddm_trt.export.manifest import read_manifest, write_manifest

    export = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_export, export)
    manifest = read_manifest(export)
    manifest["flow_ttrunc"] = 100
    write_manifest(export, manifest)
    repo = tmp_path / "repo"
    build_repository(export, repo, "cpu", log=lambda _m: None)
    srv = TritonServer(repo, models=["ftddm_unet", "ftddm_flow", SAMPLER_MODEL], startup_timeout_s=240,
                       log_path=tmp_path / "server.log")
    srv.start()
    try:
        out = tmp_path / "out"
        for loop in ([], ["--server-loop"]):
            res = CliRunner().invoke(
                app,
                [
                    "upscale",
                    str(phantom_subject_dir),
                    "--out", str(out),
                    "--backend",
                    "triton",
                    "--url",
                    srv.grpc_url,
                    "--sampler",
                    "ftddm",
                    "--ttrunc",
                    "50",
                    *loop,
                ],
            )
            assert res.exit_code != 0
            assert "trainedforTtrunc=100,notTtrunc=50" in "".join(res.output.split())
            assert not out.exists()
        y, s = inputs
        with TritonBackend(srv.grpc_url) as tb:
            assert tb.flow_ttrunc == 100
            with pytest.raises(TritonInferenceError, match=r"TtruncMismatch.*Ttrunc = 100, not Ttrunc = 50"):
                tb.sample_on_server(y[:2], s[:2], SamplerSpec("ftddm", ttrunc=50), 0)  # past the client's check
            res = tb.sample_on_server(y[:2], s[:2], SamplerSpec("ftddm-dpmpp", ttrunc=100, steps=2), 0)
            assert res.nfe == 3 and res.x0.shape == (2, 1, 64, 64)
    finally:
        srv.stop()
