"""Start a real ``tritonserver`` on a model repository, wait until it serves, stop it cleanly.

The binary and its environment come from ``serving.tritonserver``; the server runs under a small guard
process (``serving.guard``) that stops it and cleans up after it when the process that started it dies.

Every server gets its own Python-backend shared-memory prefix
(``triton_python_backend_shm_region_ftddm<pid>x<port>_``), so that the regions a crashed server leaks
in ``/dev/shm`` can be removed without touching those of another server.

Example::

    with TritonServer("triton_model_repo") as server:
        backend = TritonBackend(server.grpc_url)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ftddm_trt.serving import guard
from ftddm_trt.serving.guard import SHM_DIR, parent_death_signal
from ftddm_trt.serving.tritonserver import (
    TritonServerError,
    find_tritonserver,
    prepare_backend_dir,
    server_command,
    server_environment,
)

__all__ = ["SHM_PREFIX", "TritonServer", "TritonServerError", "free_port", "guard_command", "port_in_use",
           "repository_models", "shm_regions"]

SHM_PREFIX = "triton_python_backend_shm_region_"


def guard_command() -> list[str]:
    """How the guard (``serving.guard``) is run: this interpreter in isolated mode (``-I``: no PYTHON*
    variables, no user site, not even the guard's own folder on ``sys.path``) on the module's file, so that
    it needs nothing but the standard library, however ftddm_trt itself was made importable."""
    return [sys.executable, "-I", str(Path(guard.__file__).resolve())]


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on ``host:port`` (a bind with SO_REUSEADDR fails on Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def repository_models(repository: Path) -> list[str]:
    """Names of the models in a repository (sub-folders holding a config.pbtxt)."""
    return sorted(p.name for p in Path(repository).iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())


def shm_regions(prefix: str = SHM_PREFIX) -> list[Path]:
    """Python-backend shared-memory regions in /dev/shm whose name starts with ``prefix``."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


class TritonServer:
    """A ``tritonserver`` process on loopback ports, as a context manager.

    ``start()`` launches it (log to ``log_path``; by default a file in the temp folder, removed after a
    clean stop and kept after a failure) and waits until
    the server and ``models`` (default: every model of the repository) are ready; ``stop()`` sends
    SIGTERM, waits ``stop_timeout_s``, then SIGKILLs the server's process group, and removes the
    ``/dev/shm`` regions left under this server's own prefix. Ports default to free ones; ports in use
    are refused before anything starts.

    The server runs under a small guard process (``serving.guard``, run by ``guard_command``) that receives
    a parent-death signal (Linux ``PR_SET_PDEATHSIG``): if the process that started it dies, even by
    SIGKILL, the guard stops the server and removes its stubs, shm regions, workdir and log. That signal
    follows the *thread* that called ``start()``: start servers from a thread that lives as long as the server.
    """

    def __init__(
        self,
        repository: Path | str,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        models: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 20.0,
        log_path: Path | str | None = None,
        workdir: Path | str | None = None,
        binary: str | Path | None = None,
        prefer_bundled: bool = False,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository {self.repository} does not exist")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise TritonServerError(
                f"http, grpc and metrics ports must differ, got {self.http_port}/{self.grpc_port}/{self.metrics_port}"
            )
        self.models = list(models) if models is not None else repository_models(self.repository)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.install = find_tritonserver(binary, prefer_bundled)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self._own_log = False
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.shm_prefix = f"{SHM_PREFIX}ftddm{os.getpid()}x{self.grpc_port}_"
        self.process: subprocess.Popen | None = None
        self.start_time_s: float | None = None
        self._log_file = None

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """The guard's pid (the server's parent), None before ``start()``."""
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        """The tritonserver command line the guard runs."""
        backend_dir = (
            (self.workdir or Path("<workdir>")) / "backends" if self.install.bundled else self.install.backends
        )
        return server_command(self.install, self.repository, backend_dir, self.http_port, self.grpc_port,
                              self.metrics_port, self.shm_prefix, self.host, self.log_verbose, self.extra_args)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> "TritonServer":
        """Launch the server; with ``wait`` block until it and its models are ready."""
        if self.process is not None and self.process.poll() is None:
            raise TritonServerError(f"server already running (pid {self.process.pid})")
        busy = [f"{what} {port}" for what, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port),
                                                    ("metrics", self.metrics_port)) if port_in_use(self.host, port)]
        if busy:
            raise TritonServerError(f"port(s) {', '.join(busy)} on {self.host} are in use (another server?); "
                                    "choose free ports or stop that server first")
        self._verify_network_files()
        if self.install.bundled:
            self._check_python_only()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="ftddm-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.install.bundled:
            prepare_backend_dir(self.install, self.workdir / "backends")
        if self.log_path is None:  # outside the workdir: kept after a failure, removed after a clean stop
            self._own_log = True
            self.log_path = Path(tempfile.gettempdir()) / f"ftddm-tritonserver-{os.getpid()}-{self.grpc_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        t0 = time.perf_counter()
        env = {**server_environment(self.install), guard.PARENT_ENV: str(os.getpid()),
               guard.SHM_ENV: self.shm_prefix, guard.GRACE_ENV: str(int(self.stop_timeout_s)),
               guard.WORKDIR_ENV: str(self.workdir) if self._own_workdir else "",
               guard.LOG_ENV: str(self.log_path) if self._own_log else ""}
        # a small Python guard is the server's parent, in a session of its own (killpg reaches the server and its
        # stubs); it gets SIGTERM when this thread dies (PR_SET_PDEATHSIG), even by SIGKILL, stops the
        # server and removes its workdir, shm regions and log: the server never outlives its wrapper
        self.process = subprocess.Popen(
            [*guard_command(), *self.command()], stdout=self._log_file,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(self.workdir),
            start_new_session=True, preexec_fn=parent_death_signal(os.getpid()),
        )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
            self.start_time_s = time.perf_counter() - t0
        return self

    def _verify_network_files(self) -> None:
        """Every served network file matches the sha256 repository.json recorded (before anything starts)."""
        from ftddm_trt.integrity import IntegrityError
        from ftddm_trt.serving.repository.validate import verify_repository_files

        try:
            verify_repository_files(self.repository, self.models)
        except (IntegrityError, FileNotFoundError) as err:
            raise TritonServerError(f"refusing to start on {self.repository}: {err}") from err

    def _check_python_only(self) -> None:
        """The bundled server has only the Python backend: refuse other models before starting."""
        other = []
        for m in self.models:
            text = (self.repository / m / "config.pbtxt").read_text(errors="replace")
            found = re.findall(r'^\s*(platform|backend)\s*:\s*"([^"]*)"', text, flags=re.M)
            if any(v != "python" for _k, v in found):
                other.append(f"{m} ({', '.join(f'{k} {v}' for k, v in found)})")
        if other:
            raise TritonServerError(f"the tritonserver bundled in nvidia-pytriton has only the Python backend, but "
                                    f"{', '.join(other)} need another one: generate the repository with --flavor cpu, "
                                    "or run NVIDIA's Triton container (tritonserver on PATH)")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll the HTTP endpoint until the server and ``self.models`` are ready.

        Raises TritonServerError with the log's tail if the process exits or the timeout passes."""
        import tritonclient.http as httpclient

        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        client = None
        pending = list(self.models)
        try:
            while True:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise TritonServerError(f"tritonserver exited with code {code} before it was ready "
                                            f"(log {self.log_path}):\n{self.log_tail()}")
                try:
                    if client is None:
                        client = httpclient.InferenceServerClient(
                            self.http_url, connection_timeout=2.0, network_timeout=2.0
                        )
                    if client.is_server_ready():
                        pending = [m for m in pending if not client.is_model_ready(m)]
                        if not pending:
                            return
                except Exception:  # not listening yet / connection reset while starting
                    pass
                if time.monotonic() > deadline:
                    what = f"models not ready: {', '.join(pending)}" if pending else "server not ready"
                    raise TritonServerError(f"tritonserver on {self.http_url} was not ready after {timeout_s:.0f} s "
                                            f"({what}; log {self.log_path}):\n{self.log_tail()}")
                time.sleep(0.1)
        finally:
            if client is not None:
                client.close()

    def is_running(self) -> bool:
        """True while the server (its guard) runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL fallback (the whole process group), then remove leaked /dev/shm regions
        of this server and its temporary workdir. Returns the exit code (None if never started)."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    self.process.send_signal(signal.SIGTERM)
                    self.process.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill_group()
                    self.process.wait(timeout=10)
            code = self.process.returncode
            # stubs of a killed server can outlive it for a moment: end those left in its session
            self._kill_leftovers()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.cleanup_shm()
        if self._own_log and code == 0 and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return code

    def kill(self) -> None:
        """SIGKILL the server's process group at once (tests: simulate a crash). Call stop() after."""
        self._kill_group()
        if self.process is not None:
            self.process.wait(timeout=10)

    def _kill_group(self) -> None:
        """SIGKILL the process group the (still running) server leads: the server and its stubs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group (start_new_session)
            except (ProcessLookupError, PermissionError):
                self.process.kill()
            self.process.wait(timeout=10)
        self._kill_leftovers()

    def _session_members(self) -> list[int]:
        """Pids still in the session the server led (its Python stubs), read from /proc."""
        if self.process is None or not Path("/proc").is_dir():
            return []
        sid = self.process.pid
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if len(fields) > 3 and fields[0] != "Z" and int(fields[2]) == sid and int(fields[3]) == sid:
                pids.append(int(d.name))
        return pids

    def _kill_leftovers(self, wait_s: float = 5.0) -> None:
        """Give the server's orphaned stubs ``wait_s`` to exit on their own, then SIGKILL them by pid."""
        deadline = time.monotonic() + wait_s
        while (left := self._session_members()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup_shm(self) -> list[Path]:
        """Remove /dev/shm regions under this server's prefix; returns those removed."""
        removed = []
        for p in shm_regions(self.shm_prefix):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
        return removed

    def log_tail(self, lines: int = 40) -> str:
        """The log's error lines (model load failures...) followed by its last ``lines`` lines."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        if self._log_file is not None:
            self._log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [ln for ln in text if re.match(r"^E\d{4} ", ln) and "CudaDriverHelper" not in ln]
        tail = [ln for ln in text[-lines:] if ln not in errors[-20:]]
        head = ["errors in the log:", *errors[-20:], "last lines:"] if errors else []
        return "\n".join([*head, *tail])

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({self.repository}, http={self.http_port}, grpc={self.grpc_port}, {state})"

