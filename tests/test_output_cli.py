"""Every command's output folder through the CLI: --force replaces only ftddm-trt's own output, never
the model or the input; build-engine refuses a non-empty --out; evaluate never writes into what it
reads and writes strict JSON; phantom --force leaves no stale subject; concurrent writers (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2"]
ROOT = Path(__file__).resolve().parents[1]


def flat(text: str) -> str:
    return "".join(text.split())


def test_export_force_never_deletes_the_model_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    model = shutil.copytree(tiny_model_dir, out / "model")
    before = sorted(p.name for p in model.iterdir())
    res = runner.invoke(app, ["export", "--out", str(out), "--model", str(model), "--force"])
    assert res.exit_code == 2 and "inside the output folder" in " ".join(res.output.split())
    assert sorted(p.name for p in model.iterdir()) == before


def _fake_export(tmp_path: Path) -> Path:
    """An --onnx folder that passes the CLI's first look (the refusals come before it is read)."""
    d = tmp_path / "onnx"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    return d


def test_triton_repo_force_refuses_a_users_folder(tmp_path):
    tiny_onnx_export = _fake_export(tmp_path)
    out = tmp_path / "repo"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    res = runner.invoke(app, ["triton-repo", "--onnx", str(tiny_onnx_export), "--out", str(out), "--force"])
    assert res.exit_code == 2 and "was not written by ftddm-trt" in " ".join(res.output.split())
    assert [p.name for p in out.iterdir()] == ["notes.md"]


def test_build_engine_refuses_a_non_empty_out(tmp_path):
    tiny_onnx_export = _fake_export(tmp_path)
    out = tmp_path / "engines"
    out.mkdir()
    (out / "old.plan").write_bytes(b"x")
    res = runner.invoke(app, ["build-engine", "--onnx", str(tiny_onnx_export), "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in " ".join(res.output.split())
    assert [p.name for p in out.iterdir()] == ["old.plan"]


def test_phantom_force_leaves_no_stale_subjects(tmp_path):
    out = tmp_path / "data"
    assert runner.invoke(app, ["phantom", "--out", str(out), "--subjects", "2", "--n", "8"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-000", "sub-001"]
    res = runner.invoke(app, ["phantom", "--out", str(out), "--subjects", "1", "--n", "8", "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-000"]
    (out / "sub-000" / "my_notes.txt").write_text("x")
    res = runner.invoke(app, ["phantom", "--out", str(out), "--subjects", "1", "--n", "8", "--force"])
    assert res.exit_code == 2 and "my_notes.txt" in flat(res.output)
    assert (out / "sub-000" / "my_notes.txt").is_file()


def _sr_folder(phantom_subject_dir, tiny_model_dir, out):
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, "--backend", "torch",
                              "--model", str(tiny_model_dir), "--metabolites", "NAA"])
    assert res.exit_code == 0, res.output
    return out


def test_evaluate_writes_nothing_into_its_inputs_and_strict_json(phantom_subject_dir, tiny_model_dir, tmp_path):
    sr = _sr_folder(phantom_subject_dir, tiny_model_dir, tmp_path / "sr")
    before = sorted(p.name for p in sr.iterdir())
    for bad in (sr / "metrics.json", phantom_subject_dir / "truth" / "m.json"):
        res = runner.invoke(app, ["evaluate", str(sr), str(phantom_subject_dir / "truth"), "--out", str(bad)])
        assert res.exit_code == 2 and "inside the input folder" in " ".join(res.output.split())
        assert not bad.exists()
    assert sorted(p.name for p in sr.iterdir()) == before

    # prediction == truth: PSNR is infinite; the file must still be valid JSON (null, not Infinity)
    truth_as_pred = tmp_path / "perfect"
    shutil.copytree(phantom_subject_dir / "truth", truth_as_pred)
    metrics = tmp_path / "metrics.json"
    res = runner.invoke(app, ["evaluate", str(truth_as_pred), str(phantom_subject_dir / "truth"),
                              "--input", str(phantom_subject_dir), "--out", str(metrics)])
    assert res.exit_code == 0, res.output
    text = metrics.read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["overall"]["prediction"]["psnr"] is None and data["overall"]["prediction"]["nrmse"] == 0
    res = runner.invoke(
        app, ["evaluate", str(truth_as_pred), str(phantom_subject_dir / "truth"), "--out", str(metrics)]
    )
    assert res.exit_code == 2 and "exists; pass --force" in flat(res.output).replace(
        "exists;pass--force", "exists; pass --force"
    )


def test_concurrent_writer_is_refused_before_computing(phantom_subject_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "sr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from ftddm_trt.atomic import OutputLock; import sys; l = OutputLock({str(out)!r}).acquire(); "
            "print('held', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, "--backend", "torch",
                                  "--model", str(tiny_model_dir), "--metabolites", "NAA"])
        assert res.exit_code == 2 and f"pid {holder.pid}" in " ".join(res.output.split())
        assert not out.exists()
    finally:
        holder.communicate("\n", timeout=60)
    _sr_folder(phantom_subject_dir, tiny_model_dir, out)  # free again
