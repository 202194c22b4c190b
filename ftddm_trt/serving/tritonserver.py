"""Which ``tritonserver`` binary to run, and what it needs to run (``find_tritonserver``):

- ``tritonserver`` on PATH (NVIDIA's container): run as is, with its own backends
  (``/opt/tritonserver/backends``);
- otherwise the one bundled in the ``nvidia-pytriton`` wheel (Triton 2.51, Python backend only). It
  needs an environment the wheel does not provide, which this module sets up: a backend folder
  ``backends/python/`` holding ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub
  for this interpreter's Python version; ``LD_LIBRARY_PATH`` with ``nvidia_pytriton.libs`` and the
  interpreter's ``LIBDIR`` (else the stub loads the system libpython and fails); the virtual
  environment's ``bin/`` first on PATH (the stub finds its packages through ``python3``).

``server_command`` is the command line ``launcher.TritonServer`` runs under its guard.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

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

