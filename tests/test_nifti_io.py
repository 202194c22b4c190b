"""FSL-MRS layout reading/writing (data.nifti)."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ftddm_trt.constants import METABOLITES
from ftddm_trt.data.kspace import kspace_truncate
from ftddm_trt.data.masks import lr_support_mask, support_mask_from_lr
from ftddm_trt.data.nifti.files import InputError
from ftddm_trt.data.nifti.read import read_subject
from ftddm_trt.data.nifti.resample import lr_affine_for, sr_affine
from ftddm_trt.data.nifti.write import write_maps, write_phantom_subject, write_subject
from ftddm_trt.data.phantom import make_subject
from ftddm_trt.data.qc_conventions import get_convention

A_SR = np.array([[3.4, 0, 0, -108.8], [0, 3.4, 0, -108.8], [0, 0, 3.4, -5.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def subject():
    return make_subject(5, seed=0)


def _simple(tmp_path: Path, n: int = 16, z: int = 3, **kw) -> Path:
    rng = np.random.default_rng(0)
    lr = rng.random((z, 7, n, n)).astype(np.float32) + 0.1
    return write_subject(tmp_path / "sub", lr, lr_affine_for(A_SR, n), **kw)


def _save(path: Path, data, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def test_round_trip_phantom(tmp_path, subject):
    d = write_phantom_subject(tmp_path, subject, 16, hr_masks=True)
    assert d == tmp_path / subject.subject_id
    r = read_subject(d)
    assert r.n == 16 and r.scale == 4.0 and r.kind == "raw" and r.metabolites == METABOLITES
    assert r.lr.shape == (subject.n_slices, 7, 16, 16) and r.lr.dtype == np.float32
    np.testing.assert_allclose(r.lr, kspace_truncate(subject.maps, 16)[0], atol=1e-6)
    assert r.mask_source == "masks"
    np.testing.assert_array_equal(r.mask, subject.masks)
    np.testing.assert_allclose(r.t1, subject.t1, atol=1e-5)
    np.testing.assert_allclose(r.flair, subject.flair, atol=1e-5)
    np.testing.assert_allclose(r.affine_sr, subject.mrsi_affine_hr, atol=1e-9)
    # truth is on disk, on the SR grid, and never read as input
    truth = nib.load(str(d / "truth" / "concs" / "raw" / "NAA.nii.gz"))
    assert truth.shape == (64, 64, subject.n_slices)
    np.testing.assert_allclose(truth.affine, subject.mrsi_affine_hr)
    np.testing.assert_allclose(np.asarray(truth.dataobj).transpose(2, 0, 1), subject.maps[:, 2])
    assert not list(d.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_lr_mask_comes_from_the_acquired_maps_whatever_the_qc_convention(tmp_path, subject):
    masks = []
    for name in ("ours", "mean-k0", "sample-hz-7t", "missing"):
        d = write_phantom_subject(tmp_path / name, subject, 10, hr_masks=False, convention=get_convention(name))
        r = read_subject(d)
        assert r.mask_source == "signal" and r.n == 10
        assert (r.snr is None) == (name == "missing")
        np.testing.assert_array_equal(r.mask, lr_support_mask(r.lr))
        masks.append(r.mask)
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])  # qc maps never enter M
    # M covers the truth's fine quality mask, and is not the whole field of view that LR > 0 gives
    assert (masks[0] & subject.masks).sum() / subject.masks.sum() > 0.995
    assert masks[0].mean() < 0.9 * support_mask_from_lr(r.lr > 0).mean()


def test_lr_mask_of_a_slice_does_not_depend_on_the_other_slices():
    rng = np.random.default_rng(0)
    lr = rng.random((3, 2, 16, 16)).astype(np.float32) * np.array([1.0, 50.0, 0.01])[:, None, None, None]
    whole = lr_support_mask(lr)
    for z in range(3):
        np.testing.assert_array_equal(lr_support_mask(lr[z : z + 1]), whole[z : z + 1])


def test_shared_mask_on_lr_grid_and_aliases(tmp_path):
    m = np.zeros((3, 16, 16), bool)
    m[:, 4:12, 5:9] = True
    d = _simple(tmp_path, mask=m)
    (d / "concs" / "raw" / "tCr.nii.gz").rename(d / "concs" / "raw" / "Cr+PCr.nii.gz")
    _save(d / "concs" / "raw" / "Lac.nii.gz", np.ones((16, 16, 3)), lr_affine_for(A_SR, 16))
    r = read_subject(d)
    assert r.metabolites == METABOLITES and r.skipped == ("Lac.nii.gz",)
    assert r.mask_source == "mask"
    np.testing.assert_array_equal(r.mask[:, 3], support_mask_from_lr(m))


def test_affine_convention():
    for n in (8, 10, 16, 22, 32):
        a_lr = lr_affine_for(A_SR, n)
        np.testing.assert_allclose(sr_affine(a_lr, n), A_SR)
        s = 64 / n
        for k in (0, 3, n // 2, n - 1):
            np.testing.assert_allclose(a_lr @ [k, k, 1, 1], A_SR @ [s * k, s * k, 1, 1], atol=1e-9)
        # the FOV centre is voxel n/2 of the acquired grid and voxel 32 of the SR grid
        np.testing.assert_allclose(a_lr @ [n // 2, n // 2, 0, 1], A_SR @ [32, 32, 0, 1], atol=1e-9)
    # numerically through the FFT: a blob at SR voxel (40, 24) peaks at acquired voxel (10, 6) for n=16
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    blob = np.exp(-((i - 40) ** 2 + (j - 24) ** 2) / (2 * 3.0**2))
    lr, _ = kspace_truncate(blob, 16)
    assert np.unravel_index(lr.argmax(), lr.shape) == (10, 6)


def test_write_maps_with_sd(tmp_path):
    maps = np.random.default_rng(1).random((4, 7, 64, 64)).astype(np.float32)
    write_maps(tmp_path / "out", maps, A_SR, sd=maps * 0.1)
    img = nib.load(str(tmp_path / "out" / "uncertainties" / "Gly_sd.nii.gz"))
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 0, 1), maps[:, 6] * 0.1, rtol=1e-6)
    np.testing.assert_allclose(img.affine, A_SR)
    assert nib.load(str(tmp_path / "out" / "concs" / "raw" / "tCho.nii.gz")).shape == (64, 64, 4)


def _expect(d: Path, needle: str, *, file: Path | None = None, **kw):
    with pytest.raises(InputError) as exc:
        read_subject(d, **kw)
    msg = str(exc.value)
    assert needle in msg, msg
    if file is not None:
        assert str(file) in msg, msg
    return msg


def test_missing_folder_and_files(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "missing concs folder", file=tmp_path / "empty" / "concs")
    (tmp_path / "empty" / "concs" / "raw").mkdir(parents=True)
    _expect(tmp_path / "empty", "no metabolite maps", file=tmp_path / "empty" / "concs")
    d = _simple(tmp_path)
    _expect(d, "no metabolite maps", file=d / "concs" / "molality", kind="molality")


@pytest.mark.parametrize(
    "shape, needle",
    [((16, 14, 3), "not square"), ((15, 15, 3), "odd"), ((128, 128, 3), "larger than"),
     ((34, 34, 3), "not a supported"), ((16, 16, 3, 2), "4D")],
)
def test_bad_grids(tmp_path, shape, needle):
    d = _simple(tmp_path)
    bad = _save(d / "concs" / "raw" / "Gln.nii.gz", np.ones(shape), lr_affine_for(A_SR, 16))
    _expect(d, needle, file=bad)


def test_nan_and_mismatches(tmp_path):
    d = _simple(tmp_path)
    a = lr_affine_for(A_SR, 16)
    data = np.ones((16, 16, 3))
    data[2, 3, 1] = np.nan
    bad = _save(d / "concs" / "raw" / "Gly.nii.gz", data, a)
    _expect(d, "NaN", file=bad)
    bad = _save(d / "concs" / "raw" / "Gly.nii.gz", np.ones((16, 16, 4)), a)
    _expect(d, "slice count", file=bad)
    shifted = a.copy()
    shifted[0, 3] += 5.0
    bad = _save(d / "concs" / "raw" / "Gly.nii.gz", np.ones((16, 16, 3)), shifted)
    _expect(d, "affine differs", file=bad)


def test_unreadable_files(tmp_path):
    d = _simple(tmp_path)
    f = d / "concs" / "raw" / "Ins.nii.gz"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])  # truncated gzip
    _expect(d, "cannot read", file=f)
    f.write_bytes(b"this is not a nifti file at all")
    _expect(d, "cannot read", file=f)
    f.write_bytes(gzip.compress(b"\0" * 500))  # gzip of garbage
    _expect(d, "cannot read", file=f)


def test_anatomy_outside_fov(tmp_path):
    d = _simple(tmp_path)
    far = np.diag([1.0, 1.0, 1.0, 1.0])
    far[:3, 3] = [1000.0, 1000.0, 1000.0]
    t1 = _save(d / "t1.nii.gz", np.ones((100, 100, 50)), far)
    _expect(d, "does not overlap", file=t1)
    # a fine T1 covering the FOV is resampled (anti-aliased) onto the 64x64 grid
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = [-120.0, -120.0, -20.0]
    _save(d / "t1.nii.gz", np.ones((240, 240, 40)), fine)
    r = read_subject(d)
    assert r.t1.shape == (3, 64, 64) and r.flair is None
    np.testing.assert_allclose(r.t1[:, 5:-5, 5:-5], 1.0, atol=1e-5)


def test_explicit_hr_mask_any_grid(tmp_path):
    d = _simple(tmp_path)
    m = np.zeros((64, 64, 3))
    m[20:40, 10:30, :] = 1
    _save(d / "mask.nii.gz", m, A_SR)
    r = read_subject(d)
    assert r.mask_source == "mask"
    np.testing.assert_array_equal(r.mask[:, 0], m.transpose(2, 0, 1) > 0)
    far = A_SR.copy()
    far[:3, 3] += 5000
    bad = _save(d / "mask.nii.gz", m, far)
    _expect(d, "does not overlap", file=bad)


def test_read_map_folder(tmp_path, subject):
    from ftddm_trt.data.nifti.read import read_map_folder
    from ftddm_trt.data.phantom import subject_index

    assert subject_index(subject.subject_id) == 5
    d = write_phantom_subject(tmp_path, subject, 16)
    maps, aff, names = read_map_folder(d / "truth")
    assert names == METABOLITES
    np.testing.assert_array_equal(maps, subject.maps)
    np.testing.assert_allclose(aff, subject.mrsi_affine_hr)
    masks, _, names = read_map_folder(d / "truth" / "masks", metabolites=("Gly", "NAA"), subfolder=None)
    np.testing.assert_array_equal(masks > 0.5, subject.masks[:, [6, 2]])
    with pytest.raises(InputError, match="no map for"):
        read_map_folder(d / "truth", metabolites=("Lac",))
    with pytest.raises(InputError, match="no metabolite maps"):
        read_map_folder(tmp_path / "nowhere")


def test_select_keeps_maps_masks_and_qc_maps_together(phantom_subject_dir):
    from ftddm_trt.data.nifti.read import read_subject

    full = read_subject(phantom_subject_dir)
    sub = read_subject(phantom_subject_dir)
    sub.select(["NAA", "tCr"])
    assert sub.metabolites == ("NAA", "tCr")
    for name in ("lr", "mask", "snr", "fwhm"):
        got, ref = getattr(sub, name), getattr(full, name)
        assert got.shape[1] == 2
        np.testing.assert_array_equal(got[:, 0], ref[:, full.metabolites.index("NAA")])
        np.testing.assert_array_equal(got[:, 1], ref[:, full.metabolites.index("tCr")])
