"""Signals and staging (issue 12): SIGINT / SIGTERM stop a command cleanly with one line and leave
nothing partial; a SIGKILLed run's staging folder is removed by the next run; resuming `train` with
changed options is refused naming the option."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftddm_trt.atomic import STAGING_FILE

ROOT = Path(__file__).resolve().parents[1]


def start_phantom(out: Path, subjects: int = 60) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ftddm_trt.cli.main", "phantom", "--out", str(out), "--subjects", str(subjects),
         "--n", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        cwd=out.parent,
    )


def wait_for_staging(out: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    """The staging folder of ``out`` once it holds a first subject."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in out.parent.glob(f".{out.name}.*.partial"):
            if (p / STAGING_FILE).is_file() and any(p.glob("sub-*")):
                return p
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no staging folder appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_cleanly_with_one_line(tmp_path, sig):
    out = tmp_path / "data"
    proc = start_phantom(out)
    wait_for_staging(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1].startswith(f"ftddm-trt: stopped by {sig.name}")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "partial output, staging folder or lock file left behind"


def test_sigkilled_runs_staging_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "data"
    proc = start_phantom(out)
    staging = wait_for_staging(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert staging.is_dir() and not out.exists()  # SIGKILL cannot be caught: the staging folder stays ...
    again = start_phantom(out, subjects=1)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert not staging.exists()  # ... until the next run for that output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_resume_with_changed_options_is_refused(tmp_path):
    from ftddm_trt.training.trainer import TrainConfig, config_changes, train

    saved = TrainConfig(task="flow", preset="tiny", t_trunc=100)
    assert config_changes(saved, TrainConfig(task="flow", preset="tiny", t_trunc=100, iterations=5)) == []
    assert config_changes(saved, TrainConfig(task="flow", preset="tiny", t_trunc=50)) == ["--ttrunc 100 -> 50"]

    cfg = TrainConfig(task="unet", preset="tiny", iterations=1, n_subjects=5, val_every=10_000, val_examples=4,
                      batch_size=2, ckpt_every=1)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"started with other options \(--ttrunc 100 -> 50; --seed 0 -> 3\)"):
        train(
            TrainConfig(**{**cfg.__dict__, "t_trunc": 50, "seed": 3, "iterations": 2}), tmp_path / "run", progress=False
        )
    train(TrainConfig(**{**cfg.__dict__, "iterations": 2}), tmp_path / "run", progress=False)  # more iterations: fine
