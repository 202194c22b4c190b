"""`ftddm-trt phantom` through typer's CliRunner."""

import json
import re

import nibabel as nib
import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.nifti.read import read_subject
from ftddm_trt.workflows.phantom import n_for_scale

runner = CliRunner()


def test_writes_readable_subjects_and_refuses_non_empty(tmp_path):
    out = tmp_path / "ph"
    res = runner.invoke(app, ["phantom", "--out", str(out), "--subjects", "2", "--seed", "1", "--scale", "4"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "phantoms.json").read_text())
    assert manifest["n"] == 16 and manifest["subjects"] == ["sub-000", "sub-001"]
    img = nib.load(str(out / "sub-000" / "concs" / "raw" / "NAA.nii.gz"))
    z = img.shape[2]
    assert img.shape == (16, 16, z)
    assert nib.load(str(out / "sub-000" / "truth" / "concs" / "raw" / "NAA.nii.gz")).shape == (64, 64, z)
    assert nib.load(str(out / "sub-000" / "qc" / "Gly_snr.nii.gz")).shape == (16, 16, z)
    assert nib.load(str(out / "sub-000" / "t1.nii.gz")).shape == (128, 128, z)
    assert read_subject(out / "sub-001").mask_source == "signal"

    res = runner.invoke(app, ["phantom", "--out", str(out), "--subjects", "1"])
    assert res.exit_code == 2
    assert "not empty" in re.sub(r"[\s│╭╮╰╯─]+", " ", res.output)  # rich wraps the message in a box

    res = runner.invoke(app, ["phantom", "--out", str(out), "--subjects", "1", "--n", "8", "--hr-masks", "--force"])
    assert res.exit_code == 0, res.output
    assert nib.load(str(out / "sub-000" / "concs" / "raw" / "NAA.nii.gz")).shape[:2] == (8, 8)
    assert read_subject(out / "sub-000").mask_source == "masks"


def test_other_family_and_qc_conventions(tmp_path):
    out = tmp_path / "fields"
    args = ["phantom", "--out", str(out), "--subjects", "1", "--family", "fields", "--qc-convention", "missing"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "phantoms.json").read_text())
    assert manifest["family"] == "fields" and manifest["qc_convention"] == "missing"
    assert not (out / "sub-000" / "qc").exists() and read_subject(out / "sub-000").snr is None
    res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "x"), "--subjects", "1", "--qc-convention", "lcmodel"])
    assert res.exit_code == 2 and "unknown qc convention" in res.output


@pytest.mark.parametrize(
    "args", [["--scale", "9"], ["--scale", "1.5"], ["--n", "15"], ["--n", "64"], ["--scale", "4", "--n", "16"]]
)
def test_bad_options(tmp_path, args):
    res = runner.invoke(app, ["phantom", "--out", str(tmp_path / "x"), "--subjects", "1", *args])
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "x").exists()


def test_scale_to_n():
    assert [n_for_scale(s) for s in (2, 3, 4, 5, 6.4, 8)] == [32, 22, 16, 12, 10, 8]
