"""The project's own bad-input corpus (issue 12): every class a hostile user found, each ending in a
named message, a non-zero exit and nothing written, or in a run whose fallback is recorded.

Classes: degraded subjects (missing or partial anatomy, all-zero / out-of-range maps,
empty quality masks, anisotropic voxels), unusable output paths, extreme settings. Corrupt model files
are in test_integrity.py, output-folder ownership and locking in test_atomic.py / test_output_cli.py,
broken NIfTI files in test_upscale_cli.py. Add a case here with every new bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2", "--metabolites", "NAA,tCr"]


def flat(text: str) -> str:
    return "".join(text.split())


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj if data is None else data, dtype=np.float32),
                             img.affine if affine is None else affine), str(path))


def _naa(s: Path, kind: str = "raw") -> Path:
    return s / "concs" / kind / "NAA.nii.gz"


def _data(p: Path) -> np.ndarray:
    return np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)


# -- degradations: (corrupt subject, refusal text, option that accepts it, what run.json then records)
def no_t1(s):
    (s / "t1.nii.gz").unlink()


def no_anatomy(s):
    (s / "t1.nii.gz").unlink()
    (s / "flair.nii.gz").unlink()


def t1_covers_a_corner(s):
    img = nib.load(str(s / "t1.nii.gz"))  # the same grid, cut to its first 40% along x and y
    x, y = (int(0.4 * n) for n in img.shape[:2])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32)[:x, :y], img.affine), str(s / "t1.nii.gz"))


def zero_map(s):
    _rewrite(_naa(s), np.zeros_like(_data(_naa(s))))


def minus_a_million(s):
    _rewrite(_naa(s), -1e6 * np.abs(_data(_naa(s))))


def mask_empty_everywhere(s):
    """Explicit masks on the acquired grid, NAA's empty."""
    ref = nib.load(str(_naa(s)))
    for f in (s / "concs" / "raw").iterdir():
        name = f.name.removesuffix(".nii.gz")
        data = np.zeros(ref.shape, np.uint8) if name == "NAA" else np.ones(ref.shape, np.uint8)
        (s / "masks").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data, ref.affine), str(s / "masks" / f.name))


DEGRADED = [
    (no_t1, "no t1.nii.gz", ["--allow-missing-anatomy"], ("anatomy", "flair"), "missing-anatomy"),
    (
        no_anatomy,
        "no t1.nii.gz or flair.nii.gz",
        ["--allow-missing-anatomy"],
        ("anatomy", "none (zeros)"),
        "missing-anatomy",
    ),
    (t1_covers_a_corner, "t1 covers", ["--accept", "partial-anatomy"], None, "partial-anatomy"),
    (zero_map, "the maps of NAA are zero everywhere", ["--accept", "zero-maps"], None, "zero-maps"),
    (minus_a_million, "values below -1000 in NAA", ["--accept", "out-of-range"], None, "out-of-range"),
    (
        mask_empty_everywhere,
        "the quality mask of NAA is empty on every slice",
        ["--accept", "empty-mask"],
        None,
        "empty-mask",
    ),
]


@pytest.mark.parametrize("corrupt,problem,_opt,_rec,_acc", DEGRADED, ids=lambda v: getattr(v, "__name__", ""))
def test_degraded_input_is_refused_by_default(
    subject_copy, tiny_model_dir, tmp_path, corrupt, problem, _opt, _rec, _acc
):
    corrupt(subject_copy)
    out = tmp_path / "sr"
    res = runner.invoke(
        app, ["upscale", str(subject_copy), "--out", str(out), *FAST, "--backend", "torch",
              "--model", str(tiny_model_dir)]
    )
    assert res.exit_code == 2, res.output
    assert flat(problem) in flat(res.output), res.output
    assert "refused" in res.output
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("corrupt,_problem,option,record,accepted", DEGRADED, ids=lambda v: getattr(v, "__name__", ""))
def test_degraded_input_accepted_explicitly_is_recorded(
    subject_copy, tiny_model_dir, tmp_path, corrupt, _problem, option, record, accepted
):
    corrupt(subject_copy)
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(subject_copy), "--out", str(out), *FAST, "--backend", "torch",
                              "--model", str(tiny_model_dir), *option])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    if record is not None:
        assert run[record[0]] == record[1]
    if accepted is not None:  # on stderr and in run.json
        assert any(a.startswith(accepted + ":") for a in run["accepted"]), run["accepted"]
        assert flat(f"accepted {accepted}:") in flat(res.output)
    else:
        assert run["accepted"] == []
    maps = {m: _data(out / "concs" / run["kind"] / f"{m}.nii.gz") for m in ("NAA", "tCr")}
    assert all(np.isfinite(v).all() and v.min() >= 0 for v in maps.values())
    if accepted in ("zero-maps", "empty-mask"):  # the stated fallback: that map's output is zero
        assert not maps["NAA"].any() and maps["tCr"].any()


def test_anisotropic_voxels_are_noted(subject_copy, tiny_model_dir, tmp_path):
    for p in [*(subject_copy / "concs" / "raw").iterdir(), *(subject_copy / "qc").iterdir()]:
        img = nib.load(str(p))
        aff = img.affine.copy()
        aff[:3, 0] *= 1.5
        _rewrite(p, affine=aff)
    out = tmp_path / "sr"  # the stretched field of view reaches past the anatomy: accepted here
    res = runner.invoke(
        app,
        [
            "upscale",
            str(subject_copy),
            "--out", str(out),
            *FAST,
            "--backend",
            "torch",
            "--model",
            str(tiny_model_dir),
            "--accept",
            "partial-anatomy",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "anisotropic in-plane voxels" in " ".join(res.output.split())
    assert any("anisotropic in-plane voxels" in n for n in json.loads((out / "run.json").read_text())["notes"])


def test_unknown_accept_value_and_kind(phantom_subject_dir, tmp_path):
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, "--accept", "everything"])
    assert res.exit_code == 2 and "unknown --accept value" in res.output
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, "--kind", "ppm"])
    assert res.exit_code == 2 and "--kind must be one of" in flat(res.output).replace(
        "--kindmustbeoneof", "--kind must be one of"
    )
    assert not out.exists()


# -- output paths and settings: named before anything is computed
@pytest.mark.parametrize("out,message", [
    (".", "names no folder"),
    ("/dev/shm", "mount point"),
    ("x" * 300, "name is too long"),
])
def test_unusable_output_paths(phantom_subject_dir, tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", out, *FAST])
    assert res.exit_code == 2 and flat(message) in flat(res.output) and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--tau-f", "1e30"], "--tau-f must be in [0, 2]"),
    (["--tau-d", "3"], "--tau-d must be in [0, 2]"),
])
def test_extreme_settings(phantom_subject_dir, tmp_path, args, message):
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(tmp_path / "sr"), *FAST, *args])
    assert res.exit_code == 2 and flat(message) in flat(res.output)
