"""Output folders (ftddm_trt.atomic): named refusals before computing, --force replaces only what
ftddm-trt wrote, one writer at a time, staging folders of dead runs cleaned (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftddm_trt.atomic import (
    OWNER_FILE,
    STAGING_FILE,
    OutputError,
    OutputLock,
    atomic_dir,
    atomic_file,
    check_output,
    foreign_entries,
    lock_path,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]


def write_something(out: Path, force: bool = False, **kw) -> None:
    with atomic_dir(out, force=force, command="test", **kw) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_publish_records_ownership_and_force_replaces_only_own_output(tmp_path):
    out = tmp_path / "out"
    write_something(out)
    record = json.loads((out / OWNER_FILE).read_text())
    assert record["tool"] == "ftddm-trt" and record["command"] == "test"
    assert sorted(record["files"]) == ["a.txt", "sub/", "sub/b.txt"] and foreign_entries(out) == []
    assert hidden(tmp_path) == [], "staging, lock or swap files left beside OUT"
    with pytest.raises(OutputError, match="not empty; pass --force"):
        write_something(out)
    write_something(out, force=True)  # its own output: replaced
    (out / "sub" / "mine.txt").write_text("a user's file")
    with pytest.raises(OutputError, match=r"refusing --force: .* holds files ftddm-trt did not write \(sub/mine.txt\)"):
        write_something(out, force=True)
    assert (out / "sub" / "mine.txt").read_text() == "a user's file"


def test_force_refuses_a_folder_ftddm_trt_did_not_write(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutputError, match="was not written by ftddm-trt"):
        write_something(out, force=True)
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_legacy_output_without_ownership_record(tmp_path):
    out = tmp_path / "sr"
    (out / "concs").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    assert foreign_entries(out) == []
    (out / "thesis.tex").write_text("x")
    assert foreign_entries(out) == ["thesis.tex"]


@pytest.mark.parametrize("where", ["same", "out_inside_input", "input_inside_out"])
def test_refuses_inputs_overlapping_the_output(tmp_path, where):
    model = tmp_path / "model"
    model.mkdir()
    (model / "unet.safetensors").write_bytes(b"w")
    out = {"same": model, "out_inside_input": model / "out", "input_inside_out": tmp_path}[where]
    with pytest.raises(OutputError, match="inside the (input|output) folder"):
        check_output(out, force=True, inputs=(model,))
    assert (model / "unet.safetensors").read_bytes() == b"w"


def test_named_refusals_for_unusable_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad, msg in ((Path("."), "names no folder"), (tmp_path, "current folder"), (tmp_path.parent, "current folder"),
                     (Path("/dev/shm"), "mount point"), (tmp_path / ("x" * 300), "name is too long")):
        with pytest.raises(OutputError, match=msg):
            check_output(bad, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_output(tmp_path / "file", force=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be created in: chmod 555, or for root (who ignores modes) the immutable flag."""
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:
        os.chmod(parent, 0o555)
        yield parent
        os.chmod(parent, 0o755)
        return
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("running as root and chattr +i is not available: cannot make a folder read-only for root")
    try:
        yield parent
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_read_only_parent_is_named_before_anything_runs(read_only_dir):
    ran = []
    with pytest.raises(OutputError, match="read-only or no permission|cannot create the lock file"):
        with atomic_dir(read_only_dir / "out"):
            ran.append(1)
    assert ran == [] and list(read_only_dir.iterdir()) == []


def test_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, command="first") as tmp:
        (tmp / "x").write_text("1")
        with pytest.raises(OutputError, match=rf"another ftddm-trt process \(pid {os.getpid()}\) is writing"):
            write_something(out)
    assert (out / "x").read_text() == "1" and not lock_path(out).exists()


def test_lock_across_processes(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from ftddm_trt.atomic import OutputLock; import sys, time; l = OutputLock({str(out)!r}).acquire(); "
            "print('held', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"pid {holder.pid}"):
            OutputLock(out).acquire()
    finally:
        holder.communicate("\n", timeout=60)
    with OutputLock(out):  # released by the holder: free again
        pass


def test_dead_runs_staging_is_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / ".out.dead1.partial"
    stale.mkdir()
    (stale / STAGING_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    (stale / "big.onnx").write_bytes(b"0" * 1000)
    legacy = tmp_path / ".out.old2.partial"  # an older version recorded no PID
    legacy.mkdir()
    alive = tmp_path / ".out.live3.partial"
    alive.mkdir()
    (alive / STAGING_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    other = tmp_path / ".other.x.partial"
    other.mkdir()
    write_something(out)
    assert not stale.exists() and not legacy.exists()
    assert alive.exists() and other.exists()


def test_failure_or_interrupt_inside_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_dir(out) as tmp:
                (tmp / "half").write_text("x")
                raise exc
        assert not out.exists() and hidden(tmp_path) == []


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith(".json")
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_file_gets_ordinary_permissions(tmp_path):
    """Not mkstemp's private 0o600: a file written whole is readable as any new file would be."""
    import stat

    target = write_json_atomic(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_file_gives_ordinary_permissions_even_to_a_rewritten_file(tmp_path):
    target = tmp_path / "w.bin"
    with atomic_file(target) as tmp:
        tmp.unlink()  # a writer that creates its own file (as safetensors' save_file may)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
