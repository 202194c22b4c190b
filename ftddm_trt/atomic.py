"""Output folders that appear whole or not at all, are never written by two processes at once, and
replace (``--force``) only what this tool wrote.

Every command that writes a folder (upscale, evaluate, phantom, demo, export, build-engine,
triton-repo, package-model) goes through ``atomic_dir``:

1. ``check_output``: named refusals *before* any computation (``OutputError``): OUT is a file, the
   current folder or one of its parents, a mount point, too long a name, inside an input folder or
   holding one, under a parent that cannot be written, or non-empty without ``force``; with ``force``,
   OUT must have been written by ftddm-trt (its ``.ftddm-trt.json`` lists every file it wrote) and hold
   nothing else.
2. ``OutputLock``: an exclusive ``flock`` on ``.OUT.lock`` beside OUT (a second writer is refused,
   naming the first one's PID); the lock file is removed on release.
3. Staging folders of dead runs of the same OUT (``.OUT.<random>.partial``, PID recorded inside) are
   removed.
4. Everything is written into a fresh staging folder beside OUT (same filesystem), which replaces OUT
   by renames only when the writer finished; an interrupted or failed writer leaves OUT as it was.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

#: The ownership record of every folder ftddm-trt wrote: {"tool", "command", "created", "files"}.
OWNER_FILE = ".ftddm-trt.json"
#: Written into each staging folder while it is being filled (removed before publishing).
STAGING_FILE = ".ftddm-trt-staging.json"


class OutputError(OSError):
    """An output folder that cannot or must not be written (named before anything is computed)."""


class OutputBusy(OutputError):
    """Another process holds the output folder's lock."""


# -- names -----------------------------------------------------------------------------------------
def _prefix(out: Path) -> str:
    """Hidden name stem for OUT's staging, lock and swap files (shortened for very long names)."""
    name = out.name
    if len(name.encode()) > 120:
        name = name[:80] + "~" + hashlib.sha1(out.name.encode()).hexdigest()[:10]
    return f".{name}"


def lock_path(out: Path) -> Path:
    """The lock file of output folder ``out``: ``.OUT.lock`` beside it (see ``OutputLock``)."""
    return Path(out).parent / f"{_prefix(Path(out))}.lock"


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _umask() -> int:
    """This process's umask: from ``/proc/self/status`` where Linux gives it, else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _is_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- ownership -------------------------------------------------------------------------------------
def _listing(folder: Path) -> list[str]:
    """Relative paths of every file and folder under ``folder`` (folders end with '/')."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out.append(rel + "/" if p.is_dir() and not p.is_symlink() else rel)
    return out


#: Folders written before ownership records existed: a record file of ours -> the top-level names
#: that such a folder holds. Anything else in it is foreign.
LEGACY_LAYOUTS: dict[str, tuple[str, ...]] = {
    "run.json": ("concs", "uncertainties", "run.json", "report.png", "metrics.json"),  # upscale
    "sr/run.json": ("input", "sr"),  # demo
    "repository.json": ("repository.json", "ftddm_*"),  # triton-repo
    "phantoms.json": ("phantoms.json", "sub-*"),  # phantom
    "manifest.json": (
        "manifest.json",
        "*.onnx",
        "*.plan",
        "timing.cache",
        "*.safetensors",
        "*.json",
    ),  # export, engines, model
}


def foreign_entries(out: Path) -> list[str]:
    """What in ``out`` ftddm-trt did not write, from its ownership record (or, for a folder written
    before those existed, from the layout its record file implies); every entry when neither exists."""
    out = Path(out)
    if (out / OWNER_FILE).is_file():
        try:
            record = json.loads((out / OWNER_FILE).read_text())
            owned = set(record["files"]) if record.get("tool") == "ftddm-trt" else set()
        except (OSError, ValueError, KeyError, TypeError):
            owned = set()
        return [e for e in _listing(out) if e != OWNER_FILE and e not in owned]
    top = sorted(p.name for p in out.iterdir())
    for record_file, patterns in LEGACY_LAYOUTS.items():
        if (out / record_file).is_file():
            return [n for n in top if not any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    return top


def write_owner_record(folder: Path, command: str) -> None:
    """Write ``folder``'s ownership record (``OWNER_FILE``): the tool, ``command``, the time and every
    file and folder in it (what ``--force`` may later replace)."""
    files = [e for e in _listing(folder) if e not in (OWNER_FILE, STAGING_FILE)]
    record = {"tool": "ftddm-trt", "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "files": files}
    (folder / OWNER_FILE).write_text(json.dumps(record, indent=1))


# -- checks ----------------------------------------------------------------------------------------
def check_output(out: Path, force: bool = False, inputs: Iterable[Path | None] = ()) -> Path:
    """Refuse (OutputError) an output folder that must not or cannot be written; returns it resolved.

    Runs before any computation; ``atomic_dir`` repeats it under the lock.
    """
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise OutputError(f"output folder {str(out)!r} names no folder of its own (e.g. '.'); give a new folder name")
    res = out.resolve()
    cwd = Path.cwd().resolve()
    if res == cwd or res in cwd.parents:
        raise OutputError(f"output folder {res} is the current folder or holds it; choose another place")
    if len(res.name.encode()) > _name_max(_existing_ancestor(res.parent)):
        raise OutputError(f"output folder name is too long ({len(res.name.encode())} bytes, the filesystem allows "
                          f"{_name_max(_existing_ancestor(res.parent))}): {res.name[:40]}...")
    if res.exists() and os.path.ismount(res):
        raise OutputError(f"output folder {res} is a mount point; it cannot be replaced: choose a folder inside it")
    for src in inputs:
        if src is None:
            continue
        src = Path(src).resolve()
        if res == src or src in res.parents:
            raise OutputError(f"output folder {res} lies inside the input folder {src}; choose another place")
        if res in src.parents:  # replacing OUT (--force) would delete the input with it
            raise OutputError(f"input folder {src} lies inside the output folder {res}; choose another place")
    if res.exists() and not res.is_dir():
        raise OutputError(f"{res} exists and is not a folder")
    anc = _existing_ancestor(res.parent)
    if not anc.is_dir():
        raise OutputError(f"cannot create {res}: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {anc}: read-only or no permission (output folder {res})")
    if res.is_dir() and any(res.iterdir()):
        if not force:
            raise OutputError(
                f"{res} is not empty; pass --force to replace its contents (only a folder written by ftddm-trt)"
            )
        foreign = foreign_entries(res)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            ours = (res / OWNER_FILE).is_file() or any((res / k).is_file() for k in LEGACY_LAYOUTS)
            why = "holds files ftddm-trt did not write" if ours else "was not written by ftddm-trt"
            raise OutputError(f"refusing --force: {res} {why} ({shown}); move them away or choose another folder")
    return res


# -- locking ---------------------------------------------------------------------------------------
class OutputLock:
    """Exclusive advisory lock (``flock``) on ``.OUT.lock`` beside OUT, held by one writer at a time."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock, creating OUT's parent and the lock file; OutputBusy naming the holder's pid when
        another process holds it, OutputError when the lock file cannot be made. Returns ``self``."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create {self.out.parent}: {err.strerror}") from err
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(f"cannot create the lock file {self.path}: {err.strerror}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputBusy(f"another ftddm-trt process (pid {holder}) is writing {self.out}; wait for it "
                                      "or choose another folder") from err
                raise OutputError(f"cannot lock {self.path}: {err.strerror}") from err
            try:  # the holder before us may have removed the file after we opened it: retry on the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when not held)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- staging ---------------------------------------------------------------------------------------
def remove_dead_staging(out: Path) -> list[Path]:
    """Remove staging folders of OUT left by runs that died (their recorded PID is gone); call with
    OUT's lock held. Also removes a left-over ``.OUT.old``. Returns what was removed."""
    out = Path(out)
    prefix = _prefix(out) + "."
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if (
            not (p.name.startswith(prefix) and (p.name.endswith(".partial") or p.name == prefix + "old"))
            or not p.is_dir()
        ):
            continue
        if p.name.endswith(".partial"):
            try:
                info = json.loads((p / STAGING_FILE).read_text())
                if info.get("host") == socket.gethostname() and _is_pid_alive(int(info["pid"])):
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no record (an older version, or killed before writing it): we hold the lock, so it is dead
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def staging_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` with ordinary permissions (``mkdtemp`` alone makes it 0700) and
    this process's PID recorded inside."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_prefix(out)}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / STAGING_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                "output": str(out.resolve())}))
    return tmp


def publish_dir(tmp: Path, out: Path, command: str = "") -> None:
    """Record ownership, then move a finished staging folder into place; an existing ``out`` is
    swapped out, then removed."""
    (tmp / STAGING_FILE).unlink(missing_ok=True)
    write_owner_record(tmp, command)
    old = out.with_name(f"{_prefix(out)}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path, force: bool = False, inputs: Iterable[Path | None] = (), command: str = "") -> Iterator[Path]:
    """Yield a staging folder that replaces ``out`` when the block ends without an exception.

    Checks ``out`` (``check_output``, OutputError), locks it against other writers for the whole
    block, removes staging folders of dead runs, and cleans up its own staging folder whatever happens.
    """
    out = Path(out)
    inputs = tuple(inputs)
    check_output(out, force, inputs)
    with OutputLock(out):
        check_output(out, force, inputs)  # again, now that no one else can write it
        remove_dead_staging(out)
        tmp = staging_dir(out)
        try:
            yield tmp
            publish_dir(tmp, out, command)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------- single files


@contextmanager
def atomic_file(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` (``os.replace``), on an
    exception it is removed and ``path`` is left as it was.

    ``suffix``: the temporary file's ending, for writers that choose a format by the name (``.nii.gz``,
    ``.png``); by default ``path``'s own suffixes. The parent folder is created when missing. The file gets
    the permissions of any new file (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + (suffix or "".join(path.suffixes)),
                                    dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # after the writer: some replace the file they were given
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` all at once or not at all (see ``atomic_file``); the bytes reach the disk
    (``fsync``) before the file takes ``path``'s name."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all at once or not at all (see ``atomic_file``)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: object, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (a trailing newline) to ``path`` all at once or not at all."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
