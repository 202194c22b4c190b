"""Server lifecycle (issue 12), with the real tritonserver bundled in nvidia-pytriton and a one-model
cpu repository (ftddm_flow only: the cheapest to load).

- `serve` killed with SIGKILL leaves no tritonserver, stub, /dev/shm region, temp folder or log;
- `serve` and its guard both killed with SIGKILL leave no tritonserver or stub;
- a second `serve` on busy ports refuses before starting and never says "ready";
- `serve` writes no log into the current folder;
- a client rides out a server restart (bounded retry time) and names the server when it gives up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from processes import alive

from ftddm_trt.engine.triton_backend import TritonBackend, TritonUnavailable
from ftddm_trt.serving.launcher import TritonServer, TritonServerError, free_port, port_in_use, shm_regions
from ftddm_trt.serving.repository.build import build_repository
from ftddm_trt.serving.repository.render import RepoOptions

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flow_repo(tiny_onnx_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("lifecycle") / "repo"
    build_repository(tiny_onnx_export, repo, "cpu", options=RepoOptions(sampler=False), log=lambda _m: None)
    for name in ("ftddm_unet", "ftddm_unet_full"):
        shutil.rmtree(repo / name)
    return repo


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _flow_call(tb: TritonBackend) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 4, 64, 64, generator=g)
    return tb.flow_reverse(torch.randn(2, 1, 64, 64, generator=g), y, torch.full((2,), 0.9))


def _serve(repo: Path, ports: list[int], cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ftddm_trt.cli.main", "serve", "--repo", str(repo), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


def test_sigkilled_serve_leaves_nothing_and_busy_ports_are_refused(flow_repo, tmp_path):
    ports = [free_port() for _ in range(3)]
    proc = _serve(flow_repo, ports, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with TritonBackend(f"127.0.0.1:{ports[1]}", retries=0, require=("flow",)):
                    break
            except TritonUnavailable:
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.3)
        (guard,) = _children(proc.pid)
        env = _environ(guard)
        server_pids = [
            int(p) for p in subprocess.run(["pgrep", "-s", str(guard)], capture_output=True, text=True).stdout.split()
        ]
        assert guard in server_pids and len(server_pids) >= 3, "guard, tritonserver and a Python stub"
        workdir, log, prefix = Path(env["FTDDM_GUARD_WORKDIR"]), Path(env["FTDDM_GUARD_LOG"]), env["FTDDM_GUARD_SHM"]
        assert workdir.is_dir() and log.is_file() and shm_regions(prefix), "the running server's resources"
        assert not (tmp_path / "tritonserver.log").exists(), "serve must not write its log into the current folder"

        second = _serve(flow_repo, ports, tmp_path)  # same ports: refused before starting, never "ready"
        out, _ = second.communicate(timeout=120)
        assert second.returncode != 0 and "in use" in out and "ready" not in out.replace("not ready", ""), out

        proc.kill()  # SIGKILL: no handler runs in the wrapper
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (any(alive(p) for p in server_pids) or workdir.exists()
                                               or shm_regions(prefix) or log.exists()):
            time.sleep(0.2)
        assert not [p for p in server_pids if alive(p)], "tritonserver or its stubs outlived the wrapper"
        assert shm_regions(prefix) == [] and not workdir.exists() and not log.exists()
        assert not any(port_in_use("127.0.0.1", p) for p in ports)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_server_dies_with_its_guard_when_both_are_sigkilled(flow_repo, tmp_path):
    """The wrapper and the guard SIGKILLed at once (no handler runs in either): tritonserver and its stubs go too."""
    ports = [free_port() for _ in range(3)]
    proc = _serve(flow_repo, ports, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with TritonBackend(f"127.0.0.1:{ports[1]}", retries=0, require=("flow",)):
                    break
            except TritonUnavailable:
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.3)
        (guard,) = _children(proc.pid)
        server_pids = [
            int(p) for p in subprocess.run(["pgrep", "-s", str(guard)], capture_output=True, text=True).stdout.split()
        ]
        assert len(server_pids) >= 3, "guard, tritonserver and a Python stub"
        os.kill(guard, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(alive(p) for p in server_pids):
            time.sleep(0.2)
        assert not [p for p in server_pids if alive(p)], "tritonserver or its stubs outlived the guard"
        assert not any(port_in_use("127.0.0.1", p) for p in ports)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_client_rides_out_a_server_restart(flow_repo, tmp_path):
    ports = [free_port() for _ in range(3)]
    first = TritonServer(flow_repo, *ports, startup_timeout_s=240, log_path=tmp_path / "a.log").start()
    second = TritonServer(flow_repo, *ports, startup_timeout_s=240, log_path=tmp_path / "b.log")
    try:
        with pytest.raises(TritonServerError, match="in use"):
            TritonServer(flow_repo, *ports).start()  # busy ports: refused before launching anything
        tb = TritonBackend(first.grpc_url, require=("flow",), retry_s=240.0, timeout_s=60)
        before = _flow_call(tb)
        result: dict = {}

        def client():  # retried (connection refused, then unknown / not-ready model) until it answers
            try:
                result["after"] = _flow_call(tb)
            except Exception as err:  # reported below
                result["error"] = err

        first.stop()
        worker = threading.Thread(target=client)
        worker.start()
        time.sleep(1.0)
        second.start()  # from the main thread: the parent-death signal follows the thread that started it
        worker.join(240)
        assert "error" not in result, result.get("error")
        torch.testing.assert_close(result["after"], before)
        second.stop()
        tb.retry_s = 1.0
        t0 = time.monotonic()
        with pytest.raises(TritonUnavailable, match=rf"Triton server at {first.grpc_url}"):
            _flow_call(tb)
        assert time.monotonic() - t0 < 30
        tb.close()
    finally:
        first.stop()
        second.stop()
