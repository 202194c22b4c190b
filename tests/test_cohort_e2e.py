"""End to end: `upscale-cohort` over two `ftddm-trt serve` instances, one SIGKILLed mid-run.

Four small phantom subjects; the servers serve the cpu repository of the tiny export (the same
``cpu_repo`` fixture as tests/test_triton_e2e.py). Every subject must finish on the surviving server,
its maps must equal in-process ONNX Runtime for the same seed (1e-3 relative), a rerun must skip
every subject, and when the last server dies the run must stop with finished subjects kept and nothing
partial written.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_triton_e2e import cpu_repo  # noqa: F401  (the module fixture: the tiny export's cpu repository)
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.nifti.read import read_map_folder
from ftddm_trt.engine.triton_backend import TritonBackend, TritonUnavailable
from ftddm_trt.serving.launcher import free_port

pytestmark = pytest.mark.e2e
runner = CliRunner()
FAST = [
    "--sampler",
    "ftddm-dpmpp",
    "--ttrunc",
    "20",
    "--steps",
    "2",
    "--metabolites",
    "NAA,tCr",
    "--batch-size",
    "8",
    "--seed",
    "11",
]


class Serve:
    """One `ftddm-trt serve` process on free ports; ``kill_server`` SIGKILLs its tritonserver."""

    def __init__(self, repo: Path, log: Path) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.url = f"127.0.0.1:{self.ports[1]}"
        cmd = [
            sys.executable,
            "-m",
            "ftddm_trt.cli.main",
            "serve",
            "--repo",
            str(repo),
            "--http-port",
            str(self.ports[0]),
            "--grpc-port",
            str(self.ports[1]),
            "--metrics-port",
            str(self.ports[2]),
            "--log",
            str(log),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with TritonBackend(self.url, retries=0, require=("unet", "flow")):
                    return
            except TritonUnavailable:
                time.sleep(0.5)
        raise AssertionError(
            f"serve on {self.url} not ready: {self.proc.stdout.read() if self.proc.poll() is not None else ''}"
        )

    def server_pid(self) -> int:
        """The tritonserver process itself (under `serve`'s guard), found by its name and gRPC port."""
        pids = subprocess.run(["pgrep", "-x", "tritonserver"], capture_output=True, text=True).stdout.split()
        for k in pids:
            args = Path(f"/proc/{k}/cmdline").read_text().split("\0")
            if any(a.endswith(f"={self.ports[1]}") or a == str(self.ports[1]) for a in args):
                return int(k)
        raise AssertionError(f"no tritonserver on gRPC port {self.ports[1]}")

    def kill_server(self) -> None:
        os.kill(self.server_pid(), signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["subject"]: r for r in csv.DictReader(f)}


def kill_when(path: Path, serve: Serve, fired: threading.Event, timeout_s: float = 600) -> threading.Thread:
    """SIGKILL ``serve``'s server as soon as ``path`` exists (the first subject is finished)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not path.exists():
            time.sleep(0.05)
        serve.kill_server()
        fired.set()

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def test_cohort_over_two_servers_survives_a_kill(cpu_repo, tiny_onnx_export, tiny_model_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    res = runner.invoke(app, ["phantom", "--out", str(data), "--subjects", "4", "--n", "16"])
    assert res.exit_code == 0, res.output
    subjects = [f"sub-{i:03d}" for i in range(4)]

    ref = tmp_path / "ort"  # in-process ONNX Runtime, same seed and batch size
    res = runner.invoke(
        app,
        ["upscale-cohort", str(data), "--out", str(ref), "--onnx", str(tiny_onnx_export),
         "--model", str(tiny_model_dir), *FAST],
    )
    assert res.exit_code == 0, res.output

    a, b = Serve(cpu_repo, tmp_path / "a.log"), Serve(cpu_repo, tmp_path / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        out = tmp_path / "triton"
        args = [
            "upscale-cohort",
            str(data),
            "--out", str(out),
            "--backend",
            "triton",
            "--url",
            a.url,
            "--url",
            b.url,
            "--model",
            str(tiny_model_dir),
            *FAST,
        ]
        fired = threading.Event()
        kill_when(out / subjects[0], b, fired)
        res = runner.invoke(app, args)
        assert fired.is_set()
        assert res.exit_code == 0, res.output
        rows = read_csv(out / "cohort.csv")
        assert [rows[s]["status"] for s in subjects] == ["done"] * 4
        assert b.url in rows[subjects[0]]["servers"] and a.url in rows[subjects[0]]["servers"]  # spread over both
        assert all(b.url not in rows[s]["servers"] for s in subjects[2:])  # B was dropped
        assert "dropped" in res.output
        for s in subjects:
            got, _, mg = read_map_folder(out / s)
            want, _, mw = read_map_folder(ref / s)
            assert mg == mw and want.max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))

        # a rerun skips every finished subject (B is gone: the pool starts on A alone)
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert [read_csv(out / "cohort.csv")[s]["status"] for s in subjects] == ["skipped"] * 4

        # the last server dies mid-run: stop cleanly, finished subjects kept, nothing partial
        out2 = tmp_path / "triton2"
        fired2 = threading.Event()
        kill_when(out2 / subjects[0], a, fired2)
        res = runner.invoke(app, ["upscale-cohort", str(data), "--out", str(out2), "--backend", "triton",
                                  "--url", a.url, "--url", b.url, "--model", str(tiny_model_dir), *FAST])
        assert fired2.is_set() and res.exit_code == 1, res.output
        rows = read_csv(out2 / "cohort.csv")
        assert rows[subjects[0]]["status"] == "done"
        assert rows[subjects[1]]["status"] in ("done", "failed")
        assert any("servers gone" in r["message"] for r in rows.values())
        assert rows[subjects[3]]["status"] == "not run"
        written = sorted(p.name for p in out2.iterdir())
        assert written == ["cohort.csv", *[s for s in subjects if rows[s]["status"] == "done"]]
    finally:
        a.stop()
        b.stop()
