"""The ``fields`` phantom family (data.field_phantom): shapes, determinism, masks, levels."""

from __future__ import annotations

import numpy as np
import pytest

from ftddm_trt.constants import FWHM_MAX_PPM, METABOLITES, SNR_MIN
from ftddm_trt.data.field_phantom import LEVEL_RANGES, generate_field_dataset, make_field_subject, rim_keep


@pytest.fixture(scope="module")
def dataset():
    return generate_field_dataset(2, seed=0)


def test_shapes_and_dtypes(dataset):
    for i, s in enumerate(dataset):
        z = s.brain.shape[0]
        assert s.subject_id == f"sub-{i:03d}"
        assert s.maps.shape == s.masks.shape == s.snr.shape == s.fwhm.shape == (z, len(METABOLITES), 64, 64)
        assert s.maps.dtype == s.snr.dtype == s.fwhm.dtype == np.float32
        assert s.masks.dtype == s.brain.dtype == np.bool_
        assert s.t1.shape == s.flair.shape == s.labels.shape == (z, 64, 64)
        assert s.t1_hires.shape == (z, 128, 128) and s.anat_affine.shape == s.mrsi_affine_hr.shape == (4, 4)
        assert isinstance(s.has_tumour, bool)
        assert np.isfinite(s.maps).all() and np.isfinite(s.snr).all() and np.isfinite(s.fwhm).all()


def test_deterministic_and_seed_dependent(dataset):
    again = make_field_subject(0, 0)
    for name in ("maps", "masks", "snr", "fwhm", "t1", "brain"):
        np.testing.assert_array_equal(getattr(again, name), getattr(dataset[0], name))
    assert again.has_tumour == dataset[0].has_tumour
    other = make_field_subject(0, 1)
    assert not np.array_equal(other.maps, dataset[0].maps)
    assert not np.array_equal(dataset[1].maps[: len(dataset[0].maps)], dataset[0].maps[: len(dataset[1].maps)])


def test_maps_confined_to_masks_and_brain(dataset):
    for s in dataset:
        brain = s.brain[:, None]
        assert not (s.masks & ~brain).any()
        assert (s.maps[~s.masks] == 0).all()
        assert (s.maps[s.masks] > 0).all()
        assert (s.snr[~np.broadcast_to(brain, s.snr.shape)] == 0).all()
        assert (s.snr[np.broadcast_to(brain, s.snr.shape)] > 0).all()
        assert 0.03 - 1e-6 <= s.fwhm.min() and s.fwhm.max() <= 0.3 + 1e-6


def test_mask_definition(dataset):
    for i, s in enumerate(dataset):
        keep = rim_keep(i, 0, s.brain)
        assert keep.sum() < s.brain.sum()  # the rim removes something
        expected = (s.brain & keep)[:, None] & (s.snr >= SNR_MIN) & (s.fwhm <= FWHM_MAX_PPM)
        np.testing.assert_array_equal(s.masks, expected)


def test_levels_plausible_and_partially_correlated(dataset):
    for s in dataset:
        for c, met in enumerate(METABOLITES):
            lo, hi = LEVEL_RANGES[met]
            assert lo <= np.median(s.maps[:, c][s.masks[:, c]]) <= hi, met
        both = s.masks.all(axis=1)
        corr = np.corrcoef(s.maps.transpose(1, 0, 2, 3)[:, both])
        off = corr[~np.eye(len(METABOLITES), dtype=bool)]
        assert np.abs(off).max() < 0.98  # no two metabolites are copies of each other


def test_mask_fraction(dataset):
    fractions = [s.masks.sum() / (s.brain.sum() * len(METABOLITES)) for s in dataset]
    assert 0.5 <= np.mean(fractions) <= 0.98
    # SNR, linewidth and rim each remove something somewhere
    s = dataset[0]
    brain = np.broadcast_to(s.brain[:, None], s.snr.shape)
    assert (brain & (s.snr < SNR_MIN)).any()
    assert (brain & (s.fwhm > FWHM_MAX_PPM)).any()
