"""The guard between TritonServer and tritonserver (ftddm_trt.serving.guard), run on small stand-in servers:
exit codes, signal forwarding, the SIGKILL after the grace time, the clean-up once the wrapper is gone, and
the server's end when the guard is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive

from ftddm_trt.serving import guard
from ftddm_trt.serving.launcher import guard_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard relies on Linux prctl")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _server(code: str) -> list[str]:
    """A stand-in server: this interpreter running ``code``."""
    return [sys.executable, "-c", code]


def _start(command: list[str], parent: int | None = None, **env: str) -> subprocess.Popen:
    """The guard on ``command`` as TritonServer starts it (own session), wrapper pid ``parent``."""
    full_env = {**os.environ, guard.PARENT_ENV: str(os.getpid() if parent is None else parent), **env}
    return subprocess.Popen([*guard_command(), *command], env=full_env, start_new_session=True)


def _wait_for(path: Path, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def _ready_server(ready: Path, ignore_term: bool = False) -> list[str]:
    """A server that writes its pid to ``ready`` once running, then sleeps (ignoring SIGTERM if asked)."""
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_term else ""
    return _server(f"import os, signal, time, pathlib; {ignore}"
                   f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid())); time.sleep(60)")


def test_exit_code_and_is_alive():
    assert [guard.exit_code(c) for c in (0, 3, -15, -9)] == [0, 3, 143, 137]
    assert guard.is_alive(os.getpid()) and not guard.is_alive(_dead_pid())


def test_remove_leftovers_takes_only_what_the_variables_name(tmp_path):
    shm, workdir, log = tmp_path / "shm", tmp_path / "work", tmp_path / "server.log"
    shm.mkdir()
    (workdir / "backends").mkdir(parents=True)
    log.write_text("log")
    for name in ("prefix_a", "prefix_b", "other_prefix_c"):
        (shm / name).write_text("")
    guard.remove_leftovers({guard.SHM_ENV: "", guard.WORKDIR_ENV: "", guard.LOG_ENV: ""}, shm)
    assert len(list(shm.iterdir())) == 3 and workdir.is_dir() and log.is_file()
    guard.remove_leftovers({guard.SHM_ENV: "prefix_", guard.WORKDIR_ENV: str(workdir), guard.LOG_ENV: str(log)}, shm)
    assert [p.name for p in shm.iterdir()] == ["other_prefix_c"] and not workdir.exists() and not log.exists()


def test_exit_code_is_the_servers():
    assert _start(_server("raise SystemExit(3)")).wait(timeout=30) == 3
    env = {**os.environ, guard.PARENT_ENV: str(os.getpid())}
    as_module = subprocess.run([sys.executable, "-m", "ftddm_trt.serving.guard", *_server("raise SystemExit(4)")],
                               env=env, start_new_session=True, timeout=30)
    assert as_module.returncode == 4


def test_sigterm_is_forwarded_to_the_server(tmp_path):
    ready = tmp_path / "ready"
    proc = _start(_ready_server(ready))
    server = int(_wait_for(ready))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not alive(server)


def test_a_server_ignoring_sigterm_is_killed_after_the_grace_time(tmp_path):
    ready = tmp_path / "ready"
    proc = _start(_ready_server(ready, ignore_term=True), **{guard.GRACE_ENV: "0.5"})
    _wait_for(ready)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 >= 0.5


def test_without_the_wrapper_the_guard_cleans_up_and_ends_its_session(tmp_path):
    workdir, log = tmp_path / "work", tmp_path / "server.log"
    workdir.mkdir()
    log.write_text("log")
    prefix = f"ftddm-guard-test-{os.getpid()}-"
    shm = guard.SHM_DIR / f"{prefix}region" if guard.SHM_DIR.is_dir() else None
    if shm is not None:
        shm.write_text("")
    try:
        proc = _start(_server("pass"), parent=_dead_pid(), **{guard.SHM_ENV: prefix, guard.WORKDIR_ENV: str(workdir),
                                                              guard.LOG_ENV: str(log)})
        assert proc.wait(timeout=30) == -signal.SIGKILL  # the guard ends with its session
        assert not workdir.exists() and not log.exists()
        assert shm is None or not shm.exists()
    finally:
        if shm is not None:
            shm.unlink(missing_ok=True)


def test_the_wrapper_alive_the_guard_leaves_its_files(tmp_path):
    workdir, log = tmp_path / "work", tmp_path / "server.log"
    workdir.mkdir()
    log.write_text("log")
    proc = _start(_server("pass"), **{guard.WORKDIR_ENV: str(workdir), guard.LOG_ENV: str(log)})
    assert proc.wait(timeout=30) == 0 and workdir.is_dir() and log.is_file()


def test_the_server_dies_with_a_sigkilled_guard(tmp_path):
    ready = tmp_path / "ready"
    proc = _start(_ready_server(ready))
    server = int(_wait_for(ready))
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while alive(server):
        assert time.monotonic() < deadline, "the server outlived its guard"
        time.sleep(0.05)
