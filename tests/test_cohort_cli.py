"""`ftddm-trt upscale-cohort` on ONNX Runtime with tiny networks: resume, bad subjects, option parity."""

from __future__ import annotations

import csv
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.nifti.read import read_map_folder

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2", "--metabolites", "NAA,tCr", "--batch-size", "16",
        "--tau-f", "0.9"]  # a sampling temperature: the seed matters (the default tau_f 0 is deterministic)


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    """Three phantom subjects (N = 16), the middle one broken (no concs/)."""
    root = tmp_path_factory.mktemp("cohort") / "data"
    res = runner.invoke(app, ["phantom", "--out", str(root), "--subjects", "3", "--n", "16"])
    assert res.exit_code == 0, res.output
    shutil.rmtree(root / "sub-001" / "concs")
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["subject"]: r for r in csv.DictReader(f)}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_cohort_options_are_upscales():
    """Every `upscale` option exists in `upscale-cohort` with the same default (one option set)."""
    from ftddm_trt.cli.cohort import cohort_cmd
    from ftddm_trt.cli.upscale import upscale_cmd

    up = inspect.signature(upscale_cmd).parameters
    co = inspect.signature(cohort_cmd).parameters
    for name, p in up.items():
        if name == "subject_dir":
            continue
        assert name in co, name
        if name not in ("url", "force", "out"):
            assert co[name].default is p.default, name


def test_cohort_runs_skips_and_resumes(cohort_root, tiny_onnx_export, tiny_model_dir, tmp_path):
    out = tmp_path / "sr"
    args = [
        "upscale-cohort",
        str(cohort_root),
        "--out", str(out),
        "--onnx",
        str(tiny_onnx_export),
        "--model",
        str(tiny_model_dir),
        *FAST,
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # one subject is bad
    rows = read_csv(out / "cohort.csv")
    assert [rows[s]["status"] for s in ("sub-000", "sub-001", "sub-002")] == ["done", "failed", "done"]
    assert "concs" in rows["sub-001"]["message"]
    assert rows["sub-000"]["nfe"] == "3" and rows["sub-000"]["maps"] == "34"
    assert float(rows["sub-000"]["seconds"]) > 0 and "in-process" in rows["sub-000"]["servers"]
    assert not (out / "sub-001").exists()
    assert sorted(p.name for p in out.iterdir()) == ["cohort.csv", "sub-000", "sub-002"]  # nothing partial

    # the same maps as `upscale` of that subject alone (one per-subject function)
    single = tmp_path / "single"
    res1 = runner.invoke(
        app,
        [
            "upscale",
            str(cohort_root / "sub-002"),
            "--out", str(single),
            "--onnx",
            str(tiny_onnx_export),
            "--model",
            str(tiny_model_dir),
            *FAST,
        ],
    )
    assert res1.exit_code == 0, res1.output
    a, _, ma = read_map_folder(out / "sub-002")
    b, _, mb = read_map_folder(single)
    assert ma == mb and a.max() > 0
    np.testing.assert_array_equal(a, b)

    # rerun: finished subjects are skipped (files untouched), the bad one fails again
    before = mtimes(out / "sub-000")
    res2 = runner.invoke(app, args)
    assert res2.exit_code == 1, res2.output
    rows = read_csv(out / "cohort.csv")
    assert rows["sub-000"]["status"] == "skipped" and rows["sub-002"]["status"] == "skipped"
    assert rows["sub-000"]["nfe"] == "3"
    assert mtimes(out / "sub-000") == before

    # an interrupted run: a subject folder is missing and a staging folder was left behind
    shutil.rmtree(out / "sub-002")
    (out / ".sub-002.abc.partial").mkdir()
    res3 = runner.invoke(app, args)
    rows = read_csv(out / "cohort.csv")
    assert rows["sub-000"]["status"] == "skipped" and rows["sub-002"]["status"] == "done", res3.output
    assert not (out / ".sub-002.abc.partial").exists()
    c, _, _ = read_map_folder(out / "sub-002")
    np.testing.assert_array_equal(c, a)

    # other settings: refused without --force, redone with it
    res4 = runner.invoke(app, [*args, "--seed", "5"])
    rows = read_csv(out / "cohort.csv")
    assert res4.exit_code == 1 and rows["sub-000"]["status"] == "failed" and "--force" in rows["sub-000"]["message"]
    assert mtimes(out / "sub-000") == before
    res5 = runner.invoke(app, [*args, "--seed", "5", "--force"])
    rows = read_csv(out / "cohort.csv")
    assert rows["sub-000"]["status"] == "done" and rows["sub-002"]["status"] == "done", res5.output
    d, _, _ = read_map_folder(out / "sub-002")
    assert not np.array_equal(d, a)


def test_cohort_all_good_exits_zero_and_bad_inputs(cohort_root, tiny_onnx_export, tiny_model_dir, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(cohort_root / "sub-000", good / "sub-000")
    out = tmp_path / "sr"
    res = runner.invoke(
        app,
        ["upscale-cohort", str(good), "--out", str(out), "--onnx", str(tiny_onnx_export),
         "--model", str(tiny_model_dir), *FAST],
    )
    assert res.exit_code == 0, res.output
    assert read_csv(out / "cohort.csv")["sub-000"]["status"] == "done"
    # no subjects, overlapping folders, bad options: clear errors before any work
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["upscale-cohort", str(empty), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "no sub-*" in res.output
    res = runner.invoke(app, ["upscale-cohort", str(good), "--out", str(good / "out")])
    assert res.exit_code == 2 and "overlap" in res.output
    res = runner.invoke(app, ["upscale-cohort", str(good), "--out", str(tmp_path / "o3"), "--sampler", "euler"])
    assert res.exit_code == 2 and "unknown sampler" in res.output
    assert not (tmp_path / "o3").exists()
