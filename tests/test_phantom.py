"""Synthetic glioma phantoms (data.phantom) and the quality masks behind them (data.masks)."""

import numpy as np
import pytest

from ftddm_trt.constants import METABOLITES
from ftddm_trt.data.masks import (
    area_weights,
    lr_qc_maps,
    quality_mask_from_qc,
    support_mask_from_lr,
    upsample_nearest,
)
from ftddm_trt.data.phantom import LABELS, fold_split, generate_dataset, make_subject

M = {name: i for i, name in enumerate(METABOLITES)}


@pytest.fixture(scope="module")
def dataset():
    return generate_dataset(25, seed=0)


def test_deterministic():
    a, b = make_subject(3, seed=7), make_subject(3, seed=7)
    for field in ("maps", "masks", "snr", "fwhm", "t1", "flair", "brain", "labels", "t1_hires", "flair_hires",
                  "anat_affine", "mrsi_affine_hr"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    c = make_subject(3, seed=8)
    assert a.maps.shape != c.maps.shape or not np.array_equal(a.maps, c.maps)


def test_shapes_and_types(dataset):
    assert len(dataset) == 25
    assert [s.subject_id for s in dataset[:3]] == ["sub-000", "sub-001", "sub-002"]
    for s in dataset:
        z = s.n_slices
        assert 9 <= z <= 18
        assert s.maps.shape == s.masks.shape == s.snr.shape == s.fwhm.shape == (z, 7, 64, 64)
        assert s.maps.dtype == np.float32 and s.masks.dtype == bool
        assert s.t1.shape == s.flair.shape == s.brain.shape == s.labels.shape == (z, 64, 64)
        assert s.t1_hires.shape == s.flair_hires.shape == (z, 128, 128)
        assert s.anat_affine.shape == s.mrsi_affine_hr.shape == (4, 4)
        assert np.isfinite(s.maps).all() and (s.maps >= 0).all()
    assert sum(s.has_tumour for s in dataset) >= 15


def test_masked_voxels_zero_and_mask_rules(dataset):
    for s in dataset[:8]:
        assert (s.maps[~s.masks] == 0).all()
        assert (s.masks <= s.brain[:, None]).all()
        assert (s.masks <= quality_mask_from_qc(s.snr, s.fwhm)).all()
        assert s.masks.any(axis=(0, 2, 3)).all()


def test_anatomy_grid_is_2x2_blocks(dataset):
    s = dataset[0]
    block = s.t1_hires.reshape(s.n_slices, 64, 2, 64, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(block, s.t1, atol=1e-6)
    # 64x64 voxel i and anatomy voxels 2i, 2i+1 share their centre
    i = 20
    c_sr = s.mrsi_affine_hr @ [i, i, 0, 1]
    c_a = 0.5 * (s.anat_affine @ [2 * i, 2 * i, 0, 1] + s.anat_affine @ [2 * i + 1, 2 * i + 1, 0, 1])
    np.testing.assert_allclose(c_sr, c_a, atol=1e-9)


def test_tumour_contrast(dataset):
    solid, normal = LABELS.index("solid"), (LABELS.index("gm"), LABELS.index("wm"))
    ratios = {m: [] for m in METABOLITES}
    for s in dataset:
        if not s.has_tumour:
            continue
        for m, c in M.items():
            t = (s.labels == solid) & s.masks[:, c]
            n = np.isin(s.labels, normal) & s.masks[:, c]
            if t.sum() >= 10 and n.sum() >= 100:
                ratios[m].append(s.maps[:, c][t].mean() / s.maps[:, c][n].mean())
    for m in ("tCho", "Gln", "Gly"):
        assert len(ratios[m]) >= 5 and np.median(ratios[m]) > 1.3, (m, ratios[m])
    for m in ("NAA", "tCr", "Glu"):
        assert len(ratios[m]) >= 5 and np.median(ratios[m]) < 0.8, (m, ratios[m])
    # imaging: tumour dark on T1, edema bright on FLAIR, CSF dark on FLAIR
    s = next(s for s in dataset if s.has_tumour and (s.labels == LABELS.index("edema")).sum() > 50)
    wm = s.labels == LABELS.index("wm")
    assert s.t1[s.labels == solid].mean() < 0.8 * s.t1[wm].mean()
    assert s.flair[s.labels == LABELS.index("edema")].mean() > 1.3 * s.flair[wm].mean()
    assert s.flair[s.labels == LABELS.index("csf")].mean() < 0.6 * s.flair[wm].mean()


def test_low_concentration_metabolites_lose_more_voxels(dataset):
    brain = sum(s.brain.sum() for s in dataset)
    kept = {m: sum(s.masks[:, c].sum() for s in dataset) / brain for m, c in M.items()}
    for low in ("Gly", "Gln"):
        for high in ("NAA", "tCr"):
            assert kept[low] < kept[high] - 0.05, kept
    assert 0.8 < kept["NAA"] < 0.99


def test_fold_split():
    seen_test = []
    for fold in range(5):
        train, val, test = fold_split(25, fold, 5)
        assert (len(train), len(val), len(test)) == (15, 5, 5)
        assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
        seen_test += test
    assert sorted(seen_test) == [f"sub-{i:03d}" for i in range(25)]
    with pytest.raises(ValueError):
        fold_split(25, 5, 5)


def test_lr_qc_and_support_masks(dataset):
    s = dataset[1]
    for n in (8, 10, 16, 32):
        w = area_weights(n)
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
        snr, fwhm = lr_qc_maps(s, n)
        assert snr.shape == fwhm.shape == (s.n_slices, 7, n, n)
        m = support_mask_from_lr(quality_mask_from_qc(snr, fwhm))
        assert m.shape == (s.n_slices, 7, 64, 64)
        # the dilated coarse mask covers nearly all of the true 64x64 mask
        assert (m & s.masks).sum() / s.masks.sum() > 0.97


def test_lr_qc_model_by_hand():
    # uniform SNR 3 and FWHM 0.1: an acquired voxel gains s (same TR, fewer encodes) or s^2 (time-matched)
    snr = np.full((2, 64, 64), 3.0)
    fwhm = np.full((2, 64, 64), 0.1)
    for n in (8, 10, 16):
        s_lr, f_lr = lr_qc_maps((snr, fwhm), n)
        np.testing.assert_allclose(s_lr, 3.0 * 64 / n, rtol=1e-5)
        np.testing.assert_allclose(f_lr, 0.1, rtol=1e-5)
        s2, _ = lr_qc_maps((snr, fwhm), n, snr_exponent=2)
        np.testing.assert_allclose(s2, 3.0 * (64 / n) ** 2, rtol=1e-5)
    # partial volume: a voxel partly outside the brain loses signal; FWHM is signal-weighted
    snr = np.zeros((64, 64))
    snr[:, :32] = 4.0
    fwhm = np.where(snr > 0, 0.1, 0.5)
    s_lr, f_lr = lr_qc_maps((snr, fwhm), 16)
    # voxel 8 covers positions [30, 34); signal pixels 0..31 cover up to 31.5: 1.5 / 4 of it
    assert s_lr[5, 8] == pytest.approx(1.5 / 4 * 4.0 * 4)
    assert f_lr[5, 8] == pytest.approx(0.1)
    assert f_lr[5, 12] == pytest.approx(0.5)  # no signal: plain area average


def test_upsample_nearest_centred():
    a = np.arange(16).reshape(4, 4)
    up = upsample_nearest(a, 16)  # s = 4: pixel 4k is voxel k, pixels 4k-2 .. 4k+1 belong to voxel k
    assert up[0, 0] == 0 and up[4, 4] == a[1, 1] and up[6, 6] == a[2, 2] and up[5, 5] == a[1, 1]
    assert up[15, 15] == a[3, 3]
    m = np.zeros((8, 8), bool)
    m[4, 4] = True
    sup = support_mask_from_lr(m)
    rows = np.where(sup.any(axis=1))[0]
    # voxel 4 covers pixels 28..35, dilated by 8 px
    assert rows.min() == 20 and rows.max() == 43
