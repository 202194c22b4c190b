"""evaluation.generalization.score_maps: the qc consistency step as upscale applies it, shared draws, lr-only rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ftddm_trt.diffusion.consistency import band_project
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.evaluation.generalization import Variant, qc_fine_masks, score_maps, style_maps
from ftddm_trt.evaluation.quality import example_tensors
from ftddm_trt.evaluation.volumes import map_metrics
from ftddm_trt.models.model_set import ModelSet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPEC = SamplerSpec(ttrunc=20, steps=2, tau_f=0.0)
VARIANTS = (Variant("default", SPEC, qc_weight=0.2), Variant("without qc", SPEC, lr_only=True))


@pytest.fixture(scope="module")
def maps():
    return style_maps("smooth", n_subjects=1, n_maps=3, seed=11)


def _estimator(threshold: float = 0.5):
    from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet

    torch.manual_seed(0)
    return FineMaskNet(FineMaskConfig.preset("tiny").replace(threshold=threshold, consistency_weight=0.2)).eval()


def test_lr_rows_blend_the_shared_draws_through_the_qc_fine_mask(tiny_model_dir, maps):
    pool, idx = maps
    backend = TorchBackend(ModelSet.open(tiny_model_dir))
    net = _estimator()
    n = 16
    rows = score_maps(backend, pool, idx, VARIANTS, n, "lr", batch_size=4, fine_mask_net=net)
    assert [r["method"] for r in rows] == ["zero-filled", "default", "without qc"]
    assert rows[1]["qc_consistency"] == 0.2 and rows[2]["qc_consistency"] == 0.0
    # reference: one draw, blended by hand (x + w B_n(zf - F x), cut by M), kept per map where it agrees at
    # least as well with the acquired band, scored as the bench scores
    y, s, scale, truth, region, zf = example_tensors(pool, idx, n, "lr")
    x = sample_images(backend, replace(SPEC, data_consistency=False), y, s, batch_size=4, seed=0)[0].double()
    fine = qc_fine_masks(pool, idx, n, net).double()
    assert 0 < float(fine.mean()) < float(y[:, 1].mean())
    blended = (x + 0.2 * band_project(y[:, 0:1].double() - fine * x, s)) * y[:, 1:2].double()

    def residual(a):
        return band_project(a - y[:, 0:1].double(), s).flatten(1).norm(dim=1)

    kept = torch.where((residual(blended) <= residual(x))[:, None, None, None], blended, x)[:, 0].numpy()
    zf_psnr = map_metrics(zf, truth, region)["psnr"]
    for row, est in ((rows[1], kept), (rows[2], x[:, 0].numpy())):
        m = map_metrics(np.clip(est * scale[:, None, None], 0.0, None), truth, region)
        assert row["psnr"] == pytest.approx(float(np.nanmean(m["psnr"])), abs=1e-4)
        assert row["psnr_gain"] == pytest.approx(float(np.nanmean(m["psnr"] - zf_psnr)), abs=1e-4)
    assert rows[1]["coverage"] == pytest.approx(float((y[:, 1].numpy() > 0.5)[region].mean()))


def test_rows_over_several_conventions_are_the_mean_of_each(tiny_model_dir, maps):
    pool, idx = maps
    backend = TorchBackend(ModelSet.open(tiny_model_dir))
    net = _estimator()
    both = score_maps(backend, pool, idx, VARIANTS[:1], 16, "lr", batch_size=4, fine_mask_net=net,
                      conventions=("ours", "sample-hz-7t"))[1]
    each = [score_maps(backend, pool, idx, VARIANTS[:1], 16, "lr", batch_size=4, fine_mask_net=net,
                       conventions=(c,))[1] for c in ("ours", "sample-hz-7t")]
    assert both["psnr"] == pytest.approx(np.mean([r["psnr"] for r in each]), abs=1e-4)
    assert both["conventions"] == ["ours", "sample-hz-7t"]


def test_hr_rows_use_data_consistency_and_skip_lr_only_variants(tiny_model_dir, maps):
    pool, idx = maps
    backend = TorchBackend(ModelSet.open(tiny_model_dir))
    rows = score_maps(backend, pool, idx, VARIANTS, 16, "hr", batch_size=4)
    assert [r["method"] for r in rows] == ["zero-filled", "default"]
    assert rows[1]["qc_consistency"] == 0.0 and rows[1]["spec"]["data_consistency"] is True


def test_qc_fine_masks_are_the_upscale_estimate(maps):
    from ftddm_trt.data.examples import pool_stack, prepare_example
    from ftddm_trt.data.masks import fine_mask_features
    from ftddm_trt.data.qc_conventions import acquired_qc, get_convention

    pool, idx = maps
    assert qc_fine_masks(pool, idx, 8) is None  # no estimator: no qc step
    net = _estimator()
    got = qc_fine_masks(pool, idx, 8, net, "sample")
    assert got.shape == (len(idx), 1, 64, 64) and got.dtype == torch.float32
    st = pool_stack(pool, int(idx[1]))
    ex = prepare_example(st, 8, "lr")
    feats = fine_mask_features(
        ex.y[0], ex.mask, ex.y[2], ex.y[3], 8, *acquired_qc(st[4], st[5], 8, get_convention("sample"))
    )
    assert torch.equal(got[1:2], net.mask(torch.from_numpy(feats[None])))


@pytest.mark.parametrize("protocol", ["lr", "hr"])
def test_variants_differing_in_passes_score_as_separate_runs(tiny_model_dir, maps, protocol):
    """Passes 3, 1 and 2 scored together (one shared 3-pass run) give the rows each scores alone."""
    pool, idx = maps
    backend = TorchBackend(ModelSet.open(tiny_model_dir))
    spec = replace(SPEC, tau_f=0.9)  # a stochastic flow draw: the passes must share it to match
    variants = [Variant(f"passes {p}", replace(spec, passes=p), qc_weight=0.2) for p in (3, 1, 2)]
    together = score_maps(backend, pool, idx, variants, 16, protocol, batch_size=2)
    assert [r["spec"]["passes"] for r in together[1:]] == [3, 1, 2]
    for v, row in zip(variants, together[1:]):
        alone = score_maps(backend, pool, idx, [v], 16, protocol, batch_size=2)[1]
        assert row["psnr"] == pytest.approx(alone["psnr"], abs=1e-5) and row["ssim"] == pytest.approx(
            alone["ssim"], abs=1e-6
        )
