"""Phantom styles: deterministic, visibly different from classic and from each other, every lesion count."""

from __future__ import annotations

import numpy as np
import pytest

from ftddm_trt.data.phantom import generate_dataset, make_subject
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE, STYLES, TRAIN_STYLES, SubjectDraw, get_style, style_rng


def _hf_fraction(maps: np.ndarray) -> float:
    """Share of spectral energy beyond a quarter of Nyquist (how sharp the maps are)."""
    k = np.abs(np.fft.fftshift(np.fft.fft2(maps), axes=(-2, -1))) ** 2
    f = np.abs(np.arange(64) - 32)
    far = (f[:, None] > 8) | (f[None, :] > 8)
    return float(k[..., far].sum() / k.sum())


@pytest.fixture(scope="module")
def by_style():
    return {name: [make_subject(i, 3, style=name) for i in range(3)] for name in STYLES}


def test_styles_are_deterministic_and_differ_from_classic():
    for name in ("ribbon", "smooth", "patchy"):
        a, b = make_subject(2, 5, style=name), make_subject(2, 5, style=name)
        assert np.array_equal(a.maps, b.maps) and np.array_equal(a.t1, b.t1)
        assert not np.array_equal(a.t1, make_subject(2, 5).t1)
    # the style stream never perturbs the classic one
    assert np.array_equal(make_subject(2, 5, style="classic").maps, make_subject(2, 5).maps)


def test_train_and_held_out_styles_are_disjoint_and_known():
    assert HELD_OUT_STYLE not in TRAIN_STYLES
    assert set(TRAIN_STYLES) | {HELD_OUT_STYLE} <= set(STYLES)
    with pytest.raises(ValueError, match="unknown phantom style 'nope'"):
        get_style("nope")


def test_ribbon_carves_sulcal_csf_and_smooth_blurs(by_style):
    csf = {n: np.mean([(s.labels == 1)[s.brain].mean() for s in subs]) for n, subs in by_style.items()}
    assert csf["ribbon"] > 1.2 * csf["classic"]
    sharp = {n: np.mean([_hf_fraction(s.t1_hires[:, 32:96, 32:96]) for s in subs]) for n, subs in by_style.items()}
    assert sharp["ribbon"] > 1.5 * sharp["classic"]
    hf = {n: np.mean([_hf_fraction(s.maps[:, 2]) for s in subs]) for n, subs in by_style.items()}
    assert hf["smooth"] < 0.8 * hf["classic"]


def test_holes_shrink_the_quality_masks(by_style):
    kept = {n: np.mean([s.masks.sum() / (7 * s.brain.sum()) for s in subs]) for n, subs in by_style.items()}
    assert kept["patchy"] < kept["classic"] - 0.1


def test_lesion_counts_include_none_and_several():
    counts = [
        SubjectDraw.draw(get_style("patchy"), style_rng(0, i, get_style("patchy"))).tumour_count for i in range(40)
    ]
    assert min(counts) == 0 and max(counts) == 3


def test_every_style_is_finite_and_quality_filtered(by_style):
    for subs in by_style.values():
        for s in subs:
            assert np.isfinite(s.maps).all() and np.isfinite(s.t1).all() and np.isfinite(s.flair).all()
            assert (s.maps[~s.masks] == 0).all() and (s.maps >= 0).all()


def test_generate_dataset_assigns_styles_round_robin():
    subs = generate_dataset(2, seed=4, styles=("classic", "smooth"))
    assert np.array_equal(subs[0].maps, make_subject(0, 4).maps)
    assert np.array_equal(subs[1].maps, make_subject(1, 4, style="smooth").maps)
