"""Start a real ``tritonserver`` on a model repository, wait until it serves, stop it cleanly.

Which binary (``find_tritonserver``):

- ``tritonserver`` on PATH (NVIDIA's container): run as is, with its own backends
  (``/opt/tritonserver/backends``);
- otherwise the one bundled in the ``nvidia-pytriton`` wheel (Triton 2.51, Python backend only). It
  needs an environment the wheel does not provide, which this module sets up: a backend folder
  ``backends/python/`` holding ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub
  for this interpreter's Python version; ``LD_LIBRARY_PATH`` with ``nvidia_pytriton.libs`` and the
  interpreter's ``LIBDIR`` (else the stub loads the system libpython and fails); the virtual
  environment's ``bin/`` first on PATH (the stub finds its packages through ``python3``).

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
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
SYSTEM_BACKENDS = Path("/opt/tritonserver/backends")
#: Environment variable naming a ``tritonserver`` binary to use instead of the automatic choice.
BINARY_ENV = "FTDDM_TRITONSERVER"


class TritonServerError(RuntimeError):
    """The server could not be started, died, or did not become ready in time."""


@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary and what it needs to run."""

    binary: Path
    bundled: bool  # the nvidia-pytriton copy (needs prepare_backend_dir + server_environment)
    backends: Path | None  # backend folder shipped with the binary
    lib_dirs: tuple[Path, ...] = field(default=())
    stub: Path | None = None  # python backend stub for this interpreter (bundled only)


def _pytriton_root() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver(binary: str | Path | None = None, prefer_bundled: bool = False) -> TritonInstall:
    """The binary to run: ``binary``, else ``$FTDDM_TRITONSERVER``, else ``tritonserver`` on PATH, else
    the one bundled in nvidia-pytriton. Raises TritonServerError naming what is missing."""
    root = _pytriton_root()
    bundled_bin = root / "tritonserver" / "bin" / "tritonserver" if root else None
    chosen = binary or os.environ.get(BINARY_ENV) or (None if prefer_bundled else shutil.which("tritonserver"))
    if chosen:
        path = Path(chosen).resolve()
        if not path.is_file():
            raise TritonServerError(f"tritonserver binary {path} does not exist")
        if bundled_bin is None or path != bundled_bin.resolve():
            return TritonInstall(
                binary=path, bundled=False, backends=SYSTEM_BACKENDS if SYSTEM_BACKENDS.is_dir() else None
            )
    if bundled_bin is None or not bundled_bin.is_file():
        raise TritonServerError(
            "no tritonserver found: none on PATH and the nvidia-pytriton package (which bundles "
            "one) is not installed; pip install nvidia-pytriton==0.7.0 or use NVIDIA's Triton container"
        )
    tsroot = bundled_bin.parent.parent
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tsroot / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton ships no Python backend stub for Python {ver} ({stub} is missing)")
    libdir = sysconfig.get_config_var("LIBDIR")
    lib_dirs = tuple(
        p
        for p in (root.parent / "nvidia_pytriton.libs", Path(libdir) if libdir else None)
        if p is not None and p.is_dir()
    )
    return TritonInstall(binary=bundled_bin, bundled=True, backends=tsroot / "backends", lib_dirs=lib_dirs, stub=stub)


def prepare_backend_dir(install: TritonInstall, dest: Path) -> Path:
    """Make ``dest/python/`` with libtriton_python.so, triton_python_backend_utils.py and the stub of this
    Python version (bundled binary only); returns the folder to pass as ``--backend-directory``."""
    if not install.bundled:
        if install.backends is None:
            raise TritonServerError("the system tritonserver has no backend folder at /opt/tritonserver/backends")
        return install.backends
    assert install.backends is not None and install.stub is not None
    py = Path(dest) / "python"
    py.mkdir(parents=True, exist_ok=True)
    src = install.backends / "python"
    for f in (src / "libtriton_python.so", src / "triton_python_backend_utils.py", install.stub):
        if not f.is_file():
            raise TritonServerError(f"{f} is missing from the nvidia-pytriton installation")
        shutil.copy2(f, py / f.name)
    return Path(dest)


def server_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this interpreter's ``bin/`` first on PATH; for the bundled binary also
    LD_LIBRARY_PATH with nvidia_pytriton.libs and the Python LIBDIR."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]])
    if sys.prefix != sys.base_prefix:
        env.setdefault("VIRTUAL_ENV", sys.prefix)
    if install.bundled:
        old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*(str(p) for p in install.lib_dirs), *old])
    return env


def server_command(
    install: TritonInstall,
    repository: Path,
    backend_dir: Path | None,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    shm_prefix: str,
    host: str = "127.0.0.1",
    log_verbose: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The tritonserver command line."""
    cmd = [str(install.binary), f"--model-repository={Path(repository).resolve()}"]
    if backend_dir is not None:
        cmd.append(f"--backend-directory={backend_dir}")
    cmd += [
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        f"--http-address={host}", f"--grpc-address={host}",
        "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--log-verbose={log_verbose}",
    ]
    if not install.bundled:
        # NVIDIA's container: pinned memory is useful there (the flag above only suits the CPU build)
        cmd = [c for c in cmd if not c.startswith("--pinned-memory-pool-byte-size")]
    return [*cmd, *extra_args]


#: The guard: tritonserver's parent, run with this interpreter (``python -c``; stdlib only). It forwards
#: SIGTERM / SIGINT / SIGHUP (and the parent-death signal) to the server, SIGKILLs it after the grace time,
#: removes the server's /dev/shm regions, and, when the wrapper (FTDDM_GUARD_PARENT) is gone, also the
#: workdir, the log and every process left in its session (the Python stubs). Exit code: the server's.
#: The server itself gets SIGTERM when the guard dies (Linux parent-death signal), so killing the guard,
#: even with SIGKILL and together with the wrapper, stops the server too.
GUARD_SCRIPT = r"""
import ctypes, glob, os, shutil, signal, subprocess, sys, time
env = os.environ
stop = []
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda sig, _f: stop.append(sig))
guard = os.getpid()
try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    prctl = None
def die_with_guard():
    if prctl is not None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != guard:
        os._exit(1)
server = subprocess.Popen(sys.argv[1:], preexec_fn=die_with_guard)
while server.poll() is None and not stop:
    time.sleep(0.1)
if server.poll() is None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(float(env.get("FTDDM_GUARD_GRACE", "20")))
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
code = server.returncode if server.returncode >= 0 else 128 - server.returncode
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
if not alive(int(env["FTDDM_GUARD_PARENT"])):
    time.sleep(1.0)  # stubs notice their server is gone
    for p in glob.glob("/dev/shm/" + env["FTDDM_GUARD_SHM"] + "*") if env.get("FTDDM_GUARD_SHM") else []:
        try:
            os.unlink(p)
        except OSError:
            pass
    if env.get("FTDDM_GUARD_WORKDIR"):
        shutil.rmtree(env["FTDDM_GUARD_WORKDIR"], ignore_errors=True)
    if env.get("FTDDM_GUARD_LOG"):
        try:
            os.unlink(env["FTDDM_GUARD_LOG"])
        except OSError:
            pass
    os.killpg(0, signal.SIGKILL)
sys.exit(code)
"""

PR_SET_PDEATHSIG = 1


def _parent_death_signal(parent_pid: int, sig: int = signal.SIGTERM):
    """A preexec_fn: the child gets ``sig`` when the thread that started it dies (Linux prctl), and exits
    at once if the parent is already gone. No-op where prctl is unavailable."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


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

    The server runs under a small guard process (``GUARD_SCRIPT``) that receives a parent-death signal
    (Linux ``PR_SET_PDEATHSIG``): if the process that started it dies, even by SIGKILL, the guard stops
    the server and removes its stubs, shm regions, workdir and log. That signal follows the *thread*
    that called ``start()``: start servers from a thread that lives as long as the server.
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
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
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
        env = {**server_environment(self.install), "FTDDM_GUARD_PARENT": str(os.getpid()),
               "FTDDM_GUARD_SHM": self.shm_prefix, "FTDDM_GUARD_GRACE": str(int(self.stop_timeout_s)),
               "FTDDM_GUARD_WORKDIR": str(self.workdir) if self._own_workdir else "",
               "FTDDM_GUARD_LOG": str(self.log_path) if self._own_log else ""}
        # a small Python guard is the server's parent, in a session of its own (killpg reaches the server and its
        # stubs); it gets SIGTERM when this thread dies (PR_SET_PDEATHSIG), even by SIGKILL, stops the
        # server and removes its workdir, shm regions and log: the server never outlives its wrapper
        self.process = subprocess.Popen(
            [sys.executable, "-c", GUARD_SCRIPT, *self.command()], stdout=self._log_file,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(self.workdir),
            start_new_session=True, preexec_fn=_parent_death_signal(os.getpid()),
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
