"""The guard: tritonserver's parent process, between the wrapper (``TritonServer``) and the server.

Run as ``python -I .../serving/guard.py TRITONSERVER-COMMAND...`` (``launcher.TritonServer.start`` does
so; ``python -m ftddm_trt.serving.guard`` runs the same code), so it uses the standard library only and
imports nothing of ftddm_trt. It

- starts the command (the server), which gets SIGTERM when the guard dies (Linux ``PR_SET_PDEATHSIG``):
  killing the guard, even with SIGKILL and together with the wrapper, stops the server too;
- forwards SIGTERM / SIGINT / SIGHUP (and its own parent-death signal) to the server as SIGTERM, and
  SIGKILLs it after ``$FTDDM_GUARD_GRACE`` seconds (default 20);
- when the wrapper (``$FTDDM_GUARD_PARENT``) is gone by then, removes the server's ``/dev/shm`` regions
  (``$FTDDM_GUARD_SHM`` prefix), the workdir (``$FTDDM_GUARD_WORKDIR``) and the log (``$FTDDM_GUARD_LOG``),
  then SIGKILLs every process left in its session (the Python stubs), itself included.

Its exit code is the server's (``128 + N`` for a server ended by signal ``N``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

#: Environment of the guard: the wrapper's pid (required), then what the guard removes once the wrapper is gone.
PARENT_ENV = "FTDDM_GUARD_PARENT"
SHM_ENV = "FTDDM_GUARD_SHM"
WORKDIR_ENV = "FTDDM_GUARD_WORKDIR"
LOG_ENV = "FTDDM_GUARD_LOG"
#: Seconds between the SIGTERM the guard forwards and its SIGKILL of the server.
GRACE_ENV = "FTDDM_GUARD_GRACE"
SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1
#: The signals the guard turns into a SIGTERM of the server.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def parent_death_signal(parent_pid: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the thread that started it dies (Linux prctl), and exits
    at once if the parent (``parent_pid``) is already gone. No-op where prctl is unavailable."""
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


def is_alive(pid: int) -> bool:
    """True while process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def exit_code(returncode: int) -> int:
    """A shell's exit code for a ``Popen.returncode``: ``128 + N`` for a process ended by signal ``N``."""
    return returncode if returncode >= 0 else 128 - returncode


def remove_leftovers(env: Mapping[str, str], shm_dir: Path = SHM_DIR) -> None:
    """Remove what a server leaves once it and its wrapper are gone: the ``shm_dir`` files named with the
    ``$FTDDM_GUARD_SHM`` prefix, the ``$FTDDM_GUARD_WORKDIR`` folder and the ``$FTDDM_GUARD_LOG`` file
    (each only when its variable is set and not empty)."""
    prefix = env.get(SHM_ENV)
    if prefix and shm_dir.is_dir():
        for p in shm_dir.iterdir():
            if p.name.startswith(prefix):
                try:
                    p.unlink()
                except OSError:
                    pass
    if env.get(WORKDIR_ENV):
        shutil.rmtree(env[WORKDIR_ENV], ignore_errors=True)
    if env.get(LOG_ENV):
        try:
            os.unlink(env[LOG_ENV])
        except OSError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server command ``argv`` (default ``sys.argv[1:]``) under the guard; returns its exit code.

    When the wrapper is gone this does not return: the guard ends with its whole session (SIGKILL)."""
    command = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    stop: list[int] = []
    for s in STOP_SIGNALS:
        signal.signal(s, lambda sig, _frame: stop.append(sig))
    server = subprocess.Popen(command, preexec_fn=parent_death_signal(os.getpid()))
    while server.poll() is None and not stop:
        time.sleep(0.1)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(float(env.get(GRACE_ENV, "20")))
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    code = exit_code(server.returncode)
    if not is_alive(int(env[PARENT_ENV])):
        time.sleep(1.0)  # stubs notice their server is gone
        remove_leftovers(env)
        os.killpg(0, signal.SIGKILL)
    return code


if __name__ == "__main__":
    sys.exit(main())
