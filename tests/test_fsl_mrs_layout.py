"""FSL-MRS as it is: folders built the way fsl_mrsi writes them (combined names beside their parts, qc under
the parts' names, raw + internal, sform code 2 / qform code 0) run without extra flags."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from fsl_mrsi_layout import fsl_mrsi_subject
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.constants import METABOLITES
from ftddm_trt.data.fsl_names import resolve_maps
from ftddm_trt.data.nifti.read import read_subject
from ftddm_trt.data.qc_combine import combine_fwhm, combine_snr

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--sampler", "ftddm-dpmpp", "--ttrunc", "20", "--steps", "2", "--backend", "torch"]


def flat(text: str) -> str:
    return "".join(text.split())


@pytest.fixture
def fsl(phantom_subject_dir, tmp_path):
    return fsl_mrsi_subject(phantom_subject_dir, tmp_path / "in" / "sub-fsl")


def test_combined_qc_rule():
    a, b = np.array([1.0, 0.0, 2.0]), np.array([2.0, 0.0, 0.5])
    np.testing.assert_array_equal(combine_snr([a, b]), [3.0, 0.0, 2.5])
    np.testing.assert_array_equal(combine_fwhm([np.array([0.1, 0.2]), np.array([0.12, 0.05])]), np.float32([0.12, 0.2]))


def test_names_follow_fsl_mrsi(tmp_path):
    def files(*stems):
        return [tmp_path / f"{s}.nii.gz" for s in stems]

    found, skipped, notes = resolve_maps(files("Cr", "PCr", "PCr+Cr", "NAA", "NAAG", "NAA+NAAG", "PCh+GPC", "mI"))
    assert found["tCr"].path.name == "PCr+Cr.nii.gz" and found["tCr"].components == ("Cr", "PCr")
    assert found["tCho"].components == ("GPC", "PCh") and found["Ins"].path.name == "mI.nii.gz"
    assert found["NAA"].path.name == "NAA+NAAG.nii.gz" and found["NAA"].components == ("NAA", "NAAG")
    assert any(n.startswith("NAA: read from NAA+NAAG.nii.gz") and "NAA.nii.gz not used" in n for n in notes)
    assert {p.name for p in skipped} == {"Cr.nii.gz", "PCr.nii.gz", "NAA.nii.gz", "NAAG.nii.gz"}
    found, _, _ = resolve_maps(files("NAA", "Cr"))  # Cr alone is not total creatine
    assert list(found) == ["NAA"] and found["NAA"].components == ("NAA",)
    found, _, _ = resolve_maps(files("NAA+NAAG"))
    assert found["NAA"].path.name == "NAA+NAAG.nii.gz"


def test_reader_takes_fsl_mrsi_output_as_written(fsl, phantom_subject_dir):
    sub = read_subject(fsl, kind="raw")
    ref = read_subject(phantom_subject_dir)
    assert sub.metabolites == METABOLITES and sub.missing == ()
    assert sub.mask_source == "signal" and sub.snr is not None  # qc of every map read, combinations' from their parts
    np.testing.assert_allclose(sub.snr, ref.snr, rtol=1e-5)
    np.testing.assert_array_equal(sub.fwhm, ref.fwhm)
    np.testing.assert_array_equal(sub.mask, ref.mask)
    np.testing.assert_allclose(sub.lr, ref.lr, rtol=1e-5, atol=1e-6)
    assert sub.sources["tCr"] == {"map": "concs/raw/Cr+PCr.nii.gz", "components": ["Cr", "PCr"],
                                  "snr": ["qc/Cr_snr.nii.gz", "qc/PCr_snr.nii.gz"],
                                  "fwhm": ["qc/Cr_fwhm.nii.gz", "qc/PCr_fwhm.nii.gz"]}
    assert sub.sources["NAA"]["map"] == "concs/raw/NAA+NAAG.nii.gz"
    assert any("NAA.nii.gz not used" in n for n in sub.notes)
    assert int(sub.header["sform_code"]) == 2 and int(sub.header["qform_code"]) == 0
    assert all(c > 0.99 for c in sub.anatomy_coverage.values()) and set(sub.anatomy_coverage) == {"t1", "flair"}


def test_a_missing_metabolite_is_named(fsl):
    (fsl / "concs" / "raw" / "Gly.nii.gz").unlink()
    (fsl / "concs" / "raw" / "NAA.nii.gz").unlink()
    (fsl / "concs" / "raw" / "NAAG.nii.gz").unlink()
    sub = read_subject(fsl, kind="raw")
    assert sub.missing == ("Gly",) and "NAA" in sub.metabolites and sub.snr is not None
    assert any(n.startswith("no map for Gly") for n in sub.notes)


def test_upscale_runs_fsl_mrsi_output_without_flags(fsl, tiny_model_dir, tmp_path):
    (fsl / "concs" / "raw" / "Gly.nii.gz").unlink()
    (fsl / "concs" / "internal" / "Gly.nii.gz").unlink()
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(fsl), "--out", str(out), *FAST, "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert "missingnomapforGly" in flat(res.output)
    run = json.loads((out / "run.json").read_text())
    assert run["kinds"] == ["raw", "internal"] and run["missing_metabolites"] == ["Gly"]
    assert run["mask_source"] == "signal" and run["inputs"]["raw"]["tCr"]["snr"]
    assert run["inputs"]["internal"]["tCho"]["map"] == "concs/internal/GPC+PCh.nii.gz"
    assert min(run["anatomy_coverage"].values()) > 0.99
    src = nib.load(str(fsl / "concs" / "raw" / "Cr+PCr.nii.gz"))
    n = src.shape[0]
    for kind in ("raw", "internal"):
        names = sorted(p.name for p in (out / "concs" / kind).iterdir())
        assert names == sorted(f"{m}.nii.gz" for m in METABOLITES if m != "Gly")
        img = nib.load(str(out / "concs" / kind / "tCr.nii.gz"))
        assert img.shape[:2] == (64, 64)
        assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 0
        assert img.header.get_xyzt_units() == src.header.get_xyzt_units()
        np.testing.assert_allclose(img.affine, src.affine @ np.diag([n / 64, n / 64, 1, 1]), atol=1e-5)
    raw = np.asarray(nib.load(str(out / "concs" / "raw" / "NAA.nii.gz")).dataobj)
    internal = np.asarray(nib.load(str(out / "concs" / "internal" / "NAA.nii.gz")).dataobj)
    assert raw.max() > 0 and internal.max() > 0 and not np.allclose(raw, internal)


def test_kind_restricts(fsl, tiny_model_dir, tmp_path):
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(fsl), "--out", str(out), *FAST, "--model", str(tiny_model_dir),
                              "--kind", "internal", "--metabolites", "NAA"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in (out / "concs").iterdir()] == ["internal"]
    assert json.loads((out / "run.json").read_text())["kinds"] == ["internal"]
