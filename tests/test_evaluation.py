"""evaluate_volume on synthetic volumes whose metrics are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftddm_trt.evaluation.volumes import MIN_VOXELS, evaluate_volume, markdown_table

METABS = ("NAA", "tCr")


def volume(z: int = 3, seed: int = 0):
    """Truth (Z, 2, 64, 64) > 0 inside a 20x20 box mask, 0 outside."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(1.0, 3.0, (z, 2, 64, 64)).astype(np.float32)
    mask = np.zeros(truth.shape, bool)
    mask[..., 20:40, 20:40] = True
    return truth * mask, mask


def test_perfect_prediction():
    truth, mask = volume()
    r = evaluate_volume(truth.copy(), truth, mask, METABS)
    overall = r["overall"]["prediction"]
    assert overall["nrmse"] == 0.0
    assert overall["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert overall["psnr"] == math.inf
    assert overall["coverage"] == 1.0 and overall["n_maps"] == 6
    assert overall["sharpness"] == 1.0
    for m in METABS:
        per = r["metabolites"][m]["prediction"]
        assert per["nrmse"] == 0.0 and per["ssim"] == pytest.approx(1.0) and per["coverage"] == 1.0
        assert per["n_maps"] == 3


def test_prediction_zero_on_half_the_mask():
    truth, mask = volume()
    truth = np.where(mask, 2.0, 0.0).astype(np.float32)  # constant 2 inside the mask
    pred = truth.copy()
    pred[..., 20:40, 30:40] = 0.0  # half of the 20x20 box
    r = evaluate_volume(pred, truth, mask, METABS)
    p = r["overall"]["prediction"]
    assert p["coverage"] == pytest.approx(0.5)
    assert r["metabolites"]["tCr"]["prediction"]["coverage"] == pytest.approx(0.5)
    # NRMSE = sqrt(200 * 4 / (400 * 4)); PSNR = 10 log10(range^2 / MSE) = 10 log10(4 / 2)
    assert p["nrmse"] == pytest.approx(math.sqrt(0.5))
    assert p["psnr"] == pytest.approx(10 * math.log10(2.0))
    assert 0.0 < p["ssim"] < 0.9
    assert math.isnan(p["sharpness"])  # the truth is flat inside the mask: no detail to compare with


def test_scaled_prediction_and_per_metabolite_split():
    truth, mask = volume()
    pred = truth.copy()
    pred[:, 0] *= 1.1  # NAA 10 % too high, tCr exact
    r = evaluate_volume(pred, truth, mask, METABS)
    assert r["metabolites"]["NAA"]["prediction"]["nrmse"] == pytest.approx(0.1, rel=1e-5)
    assert r["metabolites"]["tCr"]["prediction"]["nrmse"] == 0.0
    assert r["overall"]["prediction"]["nrmse"] == pytest.approx(0.05, rel=1e-5)  # mean over the 6 maps
    naa_t = truth[:, 0]
    expected_psnr = np.mean([10 * np.log10(naa_t[z].max() ** 2 / np.mean((0.1 * naa_t[z][mask[z, 0]]) ** 2))
                             for z in range(3)])
    assert r["metabolites"]["NAA"]["prediction"]["psnr"] == pytest.approx(expected_psnr, rel=1e-6)


def test_small_maps_are_left_out_and_baselines_reported():
    truth, mask = volume()
    mask[1, 1] = False
    mask[1, 1, 30, 30 : 30 + MIN_VOXELS - 1] = True  # one map with too few mask voxels
    truth = truth * mask
    zero = np.zeros_like(truth)
    r = evaluate_volume(truth.copy(), truth, mask, METABS, baselines={"zero-filled": zero})
    assert r["metabolites"]["tCr"]["prediction"]["n_maps"] == 2
    assert r["overall"]["prediction"]["n_maps"] == 5
    zf = r["overall"]["zero-filled"]
    assert zf["nrmse"] == pytest.approx(1.0) and "coverage" not in zf
    assert r["overall"]["prediction"]["coverage"] == 1.0

    table = markdown_table(r)
    lines = table.splitlines()
    assert lines[0].startswith("| metabolite | prediction PSNR") and "zero-filled NRMSE" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["NAA", "tCr", "overall"]
    assert lines[-1].rstrip().endswith("| 1.000 |")


def test_all_maps_too_small_gives_nan_not_an_error():
    truth = np.full((1, 2, 64, 64), 2.0, np.float32)
    mask = np.zeros(truth.shape, bool)
    mask[..., 0, :3] = True
    r = evaluate_volume(truth * mask, truth * mask, mask, METABS)
    assert r["overall"]["prediction"]["n_maps"] == 0 and math.isnan(r["overall"]["prediction"]["nrmse"])
