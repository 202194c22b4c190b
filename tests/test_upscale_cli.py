"""`ftddm-trt upscale` / `evaluate` / `demo` through typer's CliRunner, with tiny networks."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()

#: A short, cheap chain for every run here: flow + 2 DPM-Solver++ steps (NFE 3).
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2"]


def flat(text: str) -> str:
    """CLI output without whitespace (rich wraps long paths and messages at the console width)."""
    return "".join(text.split())


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        p.relative_to(root).as_posix(): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {p.relative_to(root).as_posix() + "/": (0, 0, "") for p in root.rglob("*") if p.is_dir()}


def torch_args(model_dir: Path) -> list[str]:
    return ["--backend", "torch", "--model", str(model_dir)]


def upscale(subject: Path, out: Path, *extra: str):
    return runner.invoke(app, ["upscale", str(subject), "--out", str(out), *FAST, *extra])


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_phantom_upscale_evaluate_chain(tiny_onnx_export, tiny_model_dir, tmp_path):
    res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "data"), "--subjects", "1", "--n", "16"])
    assert res.exit_code == 0, res.output
    subject = tmp_path / "data" / "sub-000"
    before = snapshot(subject)
    lr_img = nib.load(str(subject / "concs" / "raw" / "NAA.nii.gz"))
    n, _, z = lr_img.shape
    assert n == 16

    out = tmp_path / "sr"
    res = upscale(
        subject,
        out,
        "--onnx",
        str(tiny_onnx_export),
        "--model",
        str(tiny_model_dir),
        "--metabolites",
        "NAA,tCr",
        "--batch-size",
        "16",
        "--seed",
        "3",
    )
    assert res.exit_code == 0, res.output
    assert "NFE 3" in res.output and "mask from signal" in " ".join(res.output.split())

    s = 64 / n
    expected_affine = lr_img.affine @ np.diag([1 / s, 1 / s, 1.0, 1.0])
    assert sorted(p.name for p in (out / "concs" / "raw").iterdir()) == ["NAA.nii.gz", "tCr.nii.gz"]
    for metab in ("NAA", "tCr"):
        img = nib.load(str(out / "concs" / "raw" / f"{metab}.nii.gz"))
        assert img.shape == (64, 64, z)
        np.testing.assert_allclose(img.affine, expected_affine, atol=1e-4)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32 and np.isfinite(data).all() and data.min() >= 0 and data.max() > 0
    assert not (out / "uncertainties").exists()

    record = json.loads((out / "run.json").read_text())
    assert record["sampler"]["name"] == "ftddm-dpmpp" and record["sampler"]["ttrunc"] == 20
    assert record["sampler"]["steps"] == 2 and record["sampler"]["nfe"] == record["nfe"] == 3
    assert record["mask_source"] == "signal" and record["metabolites"] == ["NAA", "tCr"]
    assert record["n"] == 16 and record["scale"] == 4.0 and record["slices"] == z
    assert record["samples"] == 1 and record["seed"] == 3 and record["batch_size"] == 16
    assert record["backend"]["backend"] == "onnxruntime" and record["anatomy"] == "t1+flair"
    assert Path(record["input"]) == subject.resolve() and Path(record["output"]) == out.resolve()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask, "OUT kept mkdtemp's private permissions"

    # evaluate against the truth: a table, and metrics JSON (--out, outside the folders read) with
    # prediction and zero-filled entries
    res = runner.invoke(app, ["evaluate", str(out), str(subject / "truth"), "--out", str(tmp_path / "metrics.json")])
    assert res.exit_code == 0, res.output
    assert "| metabolite |" in res.output and "| overall |" in res.output and "| NAA |" in res.output
    assert not (out / "metrics.json").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["metabolites"]) == {"NAA", "tCr"}
    overall = metrics["overall"]
    assert set(overall) == {"prediction", "zero-filled"}
    assert 0.0 <= overall["prediction"]["coverage"] <= 1.0 and overall["prediction"]["n_maps"] > 0
    for method in ("prediction", "zero-filled"):
        assert np.isfinite([overall[method][k] for k in ("nrmse", "psnr", "ssim")]).all()

    # the input was never written to
    assert snapshot(subject) == before


# --------------------------------------------------------------------------------- options, folders


def test_samples_write_uncertainties(tiny_model_dir, subject_copy, tmp_path):
    before = snapshot(subject_copy)
    out = tmp_path / "sr2"
    res = upscale(
        subject_copy, out, *torch_args(tiny_model_dir), "--metabolites", "Gly", "--samples", "2", "--tau-f", "0.9"
    )
    assert res.exit_code == 0, res.output
    sd_img = nib.load(str(out / "uncertainties" / "Gly_sd.nii.gz"))
    mean_img = nib.load(str(out / "concs" / "raw" / "Gly.nii.gz"))
    assert sd_img.shape == mean_img.shape and sd_img.shape[:2] == (64, 64)
    np.testing.assert_allclose(sd_img.affine, mean_img.affine)
    sd = np.asarray(sd_img.dataobj)
    assert np.isfinite(sd).all() and sd.min() >= 0 and sd.max() > 0  # two different draws
    record = json.loads((out / "run.json").read_text())
    assert record["samples"] == 2 and record["backend"]["backend"] == "torch" and record["metabolites"] == ["Gly"]
    assert snapshot(subject_copy) == before


@pytest.mark.parametrize("clip,expected,sde", [("none", None, False), ("-0.25,1.5", [-0.25, 1.5], True)])
def test_clip_x0_option_reaches_run_json(tiny_model_dir, subject_copy, tmp_path, clip, expected, sde):
    out = tmp_path / "sr"
    res = upscale(subject_copy, out, *torch_args(tiny_model_dir), "--metabolites", "Gly", "--clip-x0", clip,
                  "--lambda-min", "none", *(["--sde"] if sde else []))
    assert res.exit_code == 0, res.output
    sampler = json.loads((out / "run.json").read_text())["sampler"]
    assert sampler["clip_x0"] == expected and sampler["lambda_min"] is None and sampler["sde"] is sde
    from ftddm_trt.engine.pipeline import SamplerSpec

    assert SamplerSpec.from_dict(sampler).clip_x0 == (None if expected is None else tuple(expected))


def test_passes_option_reaches_the_sampler_and_run_json(tiny_model_dir, subject_copy, tmp_path):
    out = tmp_path / "sr"
    res = upscale(subject_copy, out, *torch_args(tiny_model_dir), "--metabolites", "Gly", "--passes", "3")
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["sampler"]["passes"] == 3 and record["nfe"] == 3 * 2 + 1


def test_refuses_non_empty_out_without_force(tiny_model_dir, subject_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = upscale(subject_copy, out, *torch_args(tiny_model_dir))
    assert res.exit_code == 2 and flat("is not empty; pass --force") in flat(res.output)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # --force replaces only what ftddm-trt wrote: a user's file is never deleted
    res = upscale(subject_copy, out, *torch_args(tiny_model_dir), "--metabolites", "Gly", "--force")
    assert res.exit_code == 2 and flat("was not written by ftddm-trt") in flat(res.output)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    for _ in range(2):  # a fresh run, then --force over its own output
        res = upscale(subject_copy, out, *torch_args(tiny_model_dir), "--metabolites", "Gly", "--force")
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in out.iterdir()) == [".ftddm-trt.json", "concs", "report.png", "run.json"]


def test_refuses_out_inside_subject_and_subject_inside_out(tiny_model_dir, subject_copy, tmp_path):
    before = snapshot(subject_copy)
    for out in (subject_copy / "sr", subject_copy, subject_copy / "concs" / "raw"):
        res = upscale(subject_copy, out, *torch_args(tiny_model_dir), "--force")
        assert res.exit_code == 2 and "inside the input folder" in " ".join(res.output.split())
    # replacing a folder that holds the subject (--force) would delete the input with it
    res = upscale(subject_copy, subject_copy.parent, *torch_args(tiny_model_dir), "--force")
    assert res.exit_code == 2 and "inside the output folder" in " ".join(res.output.split())
    assert snapshot(subject_copy) == before


def test_a_model_without_the_samplers_network_is_refused(tiny_model_dir, subject_copy, tmp_path):
    unet_only = tmp_path / "unet_only"
    unet_only.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copyfile((tiny_model_dir / "unet").with_suffix(ext), (unet_only / "unet").with_suffix(ext))
    out = tmp_path / "work" / "out"
    res = upscale(subject_copy, out, *torch_args(unet_only), "--metabolites", "Gly")
    assert res.exit_code == 2  # the model lacks the flow the sampler needs: refused before any work
    assert "has no flow network" in " ".join(res.output.split())
    assert not out.exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampler", "ddim"], "unknown sampler"),
        (["--steps", "30"], "at most 20 steps"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--samples", "3"], "would repeat one identical output"),
        (["--scale", "2"], "--scale 2.0 does not match the data"),
        (["--metabolites", "NAA,Lac"], "no maps for Lac"),
        (["--server-loop"], "--server-loop needs --backend triton"),
        (["--clip-x0", "3,0"], "--clip-x0 needs finite LO < HI"),
        (["--clip-x0", "zero"], "--clip-x0 must be LO,HI"),
        (["--lambda-min", "low"], "--lambda-min must be a number"),
        (["--qc-consistency", "1.5"], "--qc-consistency must be in [0, 1]"),
        (["--passes", "0"], "passes must be an integer >= 1"),
        (["--sampler", "ftddm", "--passes", "2"], "passes is a setting of ftddm-dpmpp"),
    ],
)
def test_bad_options(phantom_subject_dir, tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--ttrunc", "20", *args,
                              *torch_args(tiny_model_dir)])
    assert res.exit_code == 2
    assert flat(message) in flat(res.output)
    assert not out.exists()


# ------------------------------------------------------------------------------------- bad inputs


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    new = nib.Nifti1Image(np.asarray(img.dataobj if data is None else data, dtype=np.float32),
                          img.affine if affine is None else affine)
    nib.save(new, str(path))


def _naa(subject: Path) -> Path:
    return subject / "concs" / "raw" / "NAA.nii.gz"


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def missing_concs(s: Path) -> Path:
    shutil.rmtree(s / "concs")
    return s / "concs"


def non_square(s: Path) -> Path:
    _rewrite(_naa(s), _data(_naa(s))[:, :14])
    return _naa(s)


def odd_size(s: Path) -> Path:
    _rewrite(_naa(s), _data(_naa(s))[:15, :15])
    return _naa(s)


def too_large(s: Path) -> Path:
    d = _data(_naa(s))
    _rewrite(_naa(s), np.pad(d, ((25, 25), (25, 25), (0, 0))))  # 66 x 66
    return _naa(s)


def four_d(s: Path) -> Path:
    d = _data(_naa(s))
    _rewrite(_naa(s), np.stack([d, d], axis=-1))
    return _naa(s)


def nan_values(s: Path) -> Path:
    d = _data(_naa(s))
    d[3, 4, 2] = np.nan
    _rewrite(_naa(s), d)
    return _naa(s)


def slice_mismatch(s: Path) -> Path:
    _rewrite(_naa(s), _data(_naa(s))[:, :, :-1])
    return _naa(s)


def t1_elsewhere(s: Path) -> Path:
    t1 = s / "t1.nii.gz"
    aff = nib.load(str(t1)).affine.copy()
    aff[:3, 3] += 10_000.0
    _rewrite(t1, affine=aff)
    return t1


def truncated_gzip(s: Path) -> Path:
    raw = _naa(s).read_bytes()
    _naa(s).write_bytes(raw[: len(raw) // 2])
    return _naa(s)


def not_nifti(s: Path) -> Path:
    _naa(s).write_bytes(gzip.compress(b"this is a spreadsheet, not an image\n" * 20))
    return _naa(s)


def not_gzip(s: Path) -> Path:
    _naa(s).write_text("hello")
    return _naa(s)


@pytest.mark.parametrize(
    "corrupt,problem",
    [
        (missing_concs, "missing concs folder"),
        (non_square, "in-plane size 16x14 is not square"),
        (odd_size, "in-plane size 15 is odd"),
        (too_large, "in-plane size 66 is larger than the 64x64 output grid"),
        (four_d, "4D image of shape (16, 16, 17, 2)"),
        (nan_values, "1 voxels are NaN/Inf"),
        (slice_mismatch, "slice count (16, 16, 16) differs from tCr.nii.gz (16, 16, 17)"),
        (t1_elsewhere, "image does not overlap the MRSI field of view"),
        (truncated_gzip, "cannot read NIfTI"),
        (not_nifti, "cannot read NIfTI"),
        (not_gzip, "cannot read NIfTI"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_bad_inputs_fail_clearly_and_write_nothing(subject_copy, tiny_model_dir, tmp_path, corrupt, problem):
    assert nib.load(str(_naa(subject_copy))).shape == (16, 16, 17), "the phantom fixture changed"
    bad_file = corrupt(subject_copy)
    out = tmp_path / "results" / "sr"
    res = upscale(subject_copy, out, *torch_args(tiny_model_dir))
    assert res.exit_code == 2, res.output
    text = flat(res.output)
    assert flat(f"{bad_file}:") in text, res.output  # the message names the file ...
    assert flat(problem) in text, res.output  # ... and the problem
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not (tmp_path / "results").exists() or list((tmp_path / "results").iterdir()) == []


def test_evaluate_rejects_mismatched_folders(phantom_subject_dir, tmp_path):
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nothing"), str(phantom_subject_dir / "truth")])
    assert res.exit_code == 2 and flat("nothing/concs: no metabolite maps found") in flat(res.output)
    # the LR input is not on the truth's grid
    res = runner.invoke(app, ["evaluate", str(phantom_subject_dir), str(phantom_subject_dir / "truth")])
    assert res.exit_code == 2 and "donotmatchthetruth" in flat(res.output)
    assert not (phantom_subject_dir / "metrics.json").exists()


# ------------------------------------------------------------------------------------------- demo


def test_demo_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--n", "32", "--steps", "1", *torch_args(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert "zero-filled" in res.output and "ftddm-dpmpp" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["overall"]) == {"prediction", "zero-filled"}
    assert (out / "sr" / "report.png").is_file() and (out / "input").is_dir()
    assert json.loads((out / "sr" / "run.json").read_text())["nfe"] == 2


def test_ttrunc_other_than_the_flows_is_refused(tiny_model_dir, phantom_subject_dir, tmp_path):
    """A flow draws x_Ttrunc for the Ttrunc it was trained at; another --ttrunc must be refused."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "manifest.json").write_text(json.dumps({"networks": {"flow": {"train_config": {"t_trunc": 20}}}}))
    out = tmp_path / "out"
    res = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), "--sampler", "ftddm",
                              "--ttrunc", "10", *torch_args(model)])
    assert res.exit_code != 0
    assert "trainedatTtrunc=20" in flat(res.output)
    assert not out.exists()
    ok = runner.invoke(app, ["upscale", str(phantom_subject_dir), "--out", str(out), *FAST, *torch_args(model)])
    assert ok.exit_code == 0, ok.output


def test_without_a_fine_mask_estimator_there_is_no_qc_step(tiny_model_dir, subject_copy, tmp_path):
    """A model folder without a fine-mask estimator: --qc-consistency changes nothing (no estimate of the fine
    mask is assumed from the qc maps' convention); run.json, its corrections and stderr say why."""
    from ftddm_trt.data.nifti.read import read_map_folder

    outs = {}
    for w in ("0", "0.2"):
        out = tmp_path / f"sr{w}"
        res = upscale(subject_copy, out, *torch_args(tiny_model_dir), "--metabolites", "NAA", "--qc-consistency", w)
        assert res.exit_code == 0, res.output
        record = json.loads((out / "run.json").read_text())
        qc = record["qc_consistency"]
        assert (qc["weight"], qc["applied"], qc["kept_maps"], qc["tried_maps"]) == (float(w), False, 0, 0)
        assert qc["note"] == "the model has no fine-mask estimator"
        assert record["data_consistency"]["applied"] is False and record["mask_source"] == "signal"
        assert "qc consistency: not applied" in record["corrections"][0]
        assert "qc consistency: not applied" in " ".join(res.output.split())
        outs[w] = read_map_folder(out)[0]
    np.testing.assert_array_equal(outs["0"], outs["0.2"])


def test_qc_consistency_not_applied_with_a_fine_mask(tiny_model_dir, tmp_path):
    """hr protocol (64x64 masks): full data consistency applies, the qc step does not."""
    from ftddm_trt.data.nifti.write import write_phantom_subject
    from ftddm_trt.data.phantom import make_subject

    subject = write_phantom_subject(tmp_path / "in", make_subject(1, seed=0), 16, hr_masks=True)
    out = tmp_path / "sr"
    res = upscale(subject, out, *torch_args(tiny_model_dir), "--metabolites", "NAA")
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["fine_mask"] is True and record["data_consistency"]["applied"] is True
    qc = record["qc_consistency"]
    assert (qc["applied"], qc["fine_mask"], qc["tried_maps"]) == (False, None, 0)
    assert record["corrections"][0].startswith("data consistency: applied to every map")
