"""The learned fine-mask estimator: features, network, training, and the step it feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_features_carry_what_an_lr_user_has():
    """Channel by channel against their definitions, for a batch of two maps at n = 16."""
    from ftddm_trt.data.masks import FINE_MASK_FEATURES, fine_mask_features, lr_qc_maps

    rng = np.random.default_rng(0)
    snr64 = rng.uniform(0, 8, (2, 64, 64))
    fwhm64 = rng.uniform(0.05, 0.2, (2, 64, 64))
    snr, fwhm = lr_qc_maps((snr64, fwhm64), 16)
    zf = rng.normal(size=(2, 64, 64)).astype(np.float32)
    m = (rng.random((2, 64, 64)) < 0.6).astype(np.float32)
    t1, flair = rng.random((2, 64, 64)), rng.random((2, 64, 64))
    f = fine_mask_features(zf, m, t1, flair, 16, snr, fwhm)
    assert f.shape == (2, FINE_MASK_FEATURES, 64, 64) and f.dtype == np.float32
    np.testing.assert_allclose(f[:, 0], zf * m)
    np.testing.assert_array_equal(f[:, 1], m)
    np.testing.assert_allclose(f[:, 2], t1, rtol=1e-6)
    np.testing.assert_array_equal(f[:, 4], 1.0)
    for b in range(2):  # brute force: the coarse voxel under each pixel, over its median inside M
        k = np.clip(np.floor(np.arange(64) / 4 + 0.5).astype(int), 0, 15)
        snr_up, fwhm_up = snr[b][np.ix_(k, k)], fwhm[b][np.ix_(k, k)]
        inside = m[b] > 0
        np.testing.assert_allclose(f[b, 5], np.log1p(snr_up / np.median(snr_up[inside])) / 2 * m[b], rtol=1e-5)
        np.testing.assert_allclose(f[b, 6], np.clip(fwhm_up / np.median(fwhm_up[inside]), 0, 3) * m[b], rtol=1e-5)
    np.testing.assert_allclose(f[:, 7], 0.5)
    none = fine_mask_features(zf, m, t1, flair, 16)  # no qc maps: flag and qc channels zero
    assert not none[:, 4:7].any() and np.array_equal(none[:, :4], f[:, :4])


def test_features_are_the_same_in_every_scaling_convention():
    """SNR per unit volume or per voxel (x s^k) and linewidth in ppm or Hz give the same features."""
    from ftddm_trt.data.masks import fine_mask_features
    from ftddm_trt.data.qc_conventions import acquired_qc, get_convention

    rng = np.random.default_rng(3)
    snr64, fwhm64 = rng.uniform(0, 8, (64, 64)), rng.uniform(0.05, 0.2, (64, 64))
    zf, m = rng.normal(size=(64, 64)), (rng.random((64, 64)) < 0.6).astype(np.float32)
    feats = [fine_mask_features(zf, m, m, m, 8, *acquired_qc(snr64, fwhm64, 8, get_convention(c)))
             for c in ("ours", "mean-k0", "mean-k2", "hz-3t")]
    for f in feats[1:]:
        np.testing.assert_allclose(f, feats[0], rtol=1e-5, atol=1e-6)


def test_network_shapes_mask_and_weights_round_trip(tmp_path):
    """Logits keep the image size; mask() is the thresholded probability cut by M; safetensors + JSON."""
    from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
    from ftddm_trt.models.io import load_model, save_model

    cfg = FineMaskConfig.preset("tiny").replace(threshold=0.6)
    net = FineMaskNet(cfg).eval()
    x = torch.randn(3, 8, 64, 64)
    x[:, 1] = (torch.rand(3, 64, 64) < 0.5).float()
    logits = net(x)
    assert logits.shape == (3, 1, 64, 64)
    expected = (torch.sigmoid(logits) > 0.6).float() * x[:, 1:2]
    assert torch.equal(net.mask(x), expected)
    save_model(net, cfg, tmp_path / "fine_mask")
    back = load_model(tmp_path / "fine_mask")
    assert isinstance(back, FineMaskNet) and back.config == cfg
    assert torch.equal(back(x), net(x))
    with pytest.raises(ValueError, match="threshold"):
        FineMaskConfig(threshold=1.0)
    with pytest.raises(ValueError, match="multiple of groups"):
        FineMaskConfig(channels=(12, 24), groups=8)


def test_masked_bce_and_dice_against_brute_force():
    from ftddm_trt.training.fine_mask import dice, masked_bce

    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(2, 1, 5, 5)))
    target = torch.from_numpy((rng.random((2, 1, 5, 5)) < 0.5).astype(np.float64))
    support = torch.from_numpy((rng.random((2, 1, 5, 5)) < 0.7).astype(np.float64))
    p = 1 / (1 + np.exp(-logits.numpy()))
    per = -(target.numpy() * np.log(p) + (1 - target.numpy()) * np.log(1 - p))
    want = per[support.numpy() > 0].mean()
    assert float(masked_bce(logits, target, support)) == pytest.approx(want, rel=1e-9)
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2] = True  # 8 and 8 pixels, 4 shared: 0.5; second pair both empty: 1
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.75)


def test_training_learns_the_fine_mask(tmp_path):
    """A tiny estimator trained for 60 iterations beats its untrained self on held-out maps (BCE inside M)."""
    from ftddm_trt.evaluation.generalization import style_maps
    from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
    from ftddm_trt.training.fine_mask import fine_mask_batch, masked_bce, train_fine_mask

    pool, _ = style_maps("patchy", 1, 8, seed=5)
    test_pool, idx = style_maps("patchy", 1, 16, seed=6)
    feats, target, support = fine_mask_batch(test_pool, idx, [16] * idx.size, None)
    torch.manual_seed(0)
    untrained = FineMaskNet(FineMaskConfig.preset("tiny")).eval()
    with torch.no_grad():
        before = float(masked_bce(untrained(feats), target, support))
    net, summary = train_fine_mask(pool, FineMaskConfig.preset("tiny"), iterations=60, batch_size=8, lr=3e-3, seed=0)
    with torch.no_grad():
        after = float(masked_bce(net(feats), target, support))
    assert summary["iterations"] == 60 and not net.training
    assert after < 0.7 * before, (before, after)
    with pytest.raises(ValueError, match="minutes or iterations"):
        train_fine_mask(pool, FineMaskConfig.preset("tiny"))


def test_choose_step_takes_the_best_worst_case():
    """Highest worst (style, s) gain wins, not the highest mean; the mean breaks a tie; oracle rows are ignored."""
    from ftddm_trt.evaluation.fine_mask import choose_step

    def rows(thr, w, gains, style="a"):
        return [{"mask": "learned", "threshold": thr, "weight": w, "n": n, "style": style, "psnr_gain": g}
                for n, g in zip((8, 16), gains)]

    grid = rows(0.5, 1.0, (6.0, 2.0)) + rows(0.8, 0.5, (3.5, 3.0)) + rows(0.7, 0.2, (3.0, 3.2))
    grid += [{"mask": "true mask (oracle)", "threshold": None, "weight": 1.0, "n": 8, "psnr_gain": 9.0}]
    assert choose_step(grid) == (0.8, 0.5)  # mean 4.0 / 3.25 / 3.1, worst 2.0 / 3.0 / 3.0: tie broken by the mean
    assert choose_step(grid + rows(0.8, 0.5, (1.0, 9.0), style="b")) == (0.7, 0.2)  # another style's worst case counts
    with pytest.raises(ValueError):
        choose_step(grid[-1:])


# ------------------------------------------------------------------ in upscale, finetune and add-fine-mask


def _model_with_estimator(tiny_model_dir, folder, threshold=0.5, weight=0.5):
    """A copy of the tiny model set with an untrained tiny estimator (its bias set so it keeps ~half of M)."""
    import shutil

    from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
    from ftddm_trt.models.io import save_model

    shutil.copytree(tiny_model_dir, folder)
    torch.manual_seed(0)
    cfg = FineMaskConfig.preset("tiny").replace(threshold=threshold, consistency_weight=weight)
    net = FineMaskNet(cfg).eval()
    save_model(net, cfg, folder / "fine_mask")
    return folder, net


def subject_maps(subject_dir) -> int:
    """Number of maps (slices) of NAA in a phantom subject folder."""
    from ftddm_trt.data.nifti.read import read_subject

    return read_subject(subject_dir).n_slices


def test_upscale_puts_the_band_back_through_the_learned_mask(tiny_model_dir, phantom_subject_dir, tmp_path):
    """A model folder with an estimator: the `lr` qc step goes through its thresholded mask at its own
    weight (x + w B_n(zf - P x), cut by M), run.json says so; --qc-consistency overrides the weight."""
    import json

    from typer.testing import CliRunner

    from ftddm_trt.cli.main import app
    from ftddm_trt.data.masks import fine_mask_features
    from ftddm_trt.data.nifti.read import read_map_folder, read_subject
    from ftddm_trt.diffusion.consistency import band_project
    from ftddm_trt.engine.upscale import build_condition
    from ftddm_trt.models.io import model_sha256

    model, net = _model_with_estimator(tiny_model_dir, tmp_path / "model")
    runner = CliRunner()
    outs = {}
    for w in (None, "0"):
        out = tmp_path / f"sr{w}"
        extra = [] if w is None else ["--qc-consistency", w]
        res = runner.invoke(
            app,
            [
                "upscale",
                str(phantom_subject_dir),
                "--out", str(out),
                "--sampler",
                "ftddm-dpmpp",
                "--ttrunc",
                "20",
                "--steps",
                "2",
                "--backend",
                "torch",
                "--model",
                str(model),
                "--metabolites",
                "NAA",
                *extra,
            ],
        )
        assert res.exit_code == 0, res.output
        record = json.loads((out / "run.json").read_text())["qc_consistency"]
        if w is None:
            assert {k: record[k] for k in ("weight", "applied", "fine_mask", "fine_mask_sha256", "tried_maps")} == {
                "weight": 0.5, "applied": True, "fine_mask": "learned",
                "fine_mask_sha256": model_sha256(model / "fine_mask"), "tried_maps": subject_maps(phantom_subject_dir)}
        else:
            assert record["weight"] == 0.0 and record["applied"] is False
        outs[w] = read_map_folder(out)[0]
    subject = read_subject(phantom_subject_dir)
    subject.select(["NAA"])
    cond = build_condition(subject, net)
    assert cond.qc_mask_source == "learned"
    z = cond.y.shape[0]
    feats = fine_mask_features(cond.y[:, 0].numpy(), cond.y[:, 1].numpy(), cond.y[:, 2].numpy(), cond.y[:, 3].numpy(),
                               subject.n, subject.snr.reshape(z, *subject.snr.shape[-2:]),
                               subject.fwhm.reshape(z, *subject.fwhm.shape[-2:]))
    prob = torch.sigmoid(net(torch.from_numpy(feats))).double()
    fine = (prob > 0.5).double() * cond.y[:, 1:2].double()
    assert torch.equal(fine, cond.qc_fine_mask.double())
    assert 0 < float(fine.sum()) < float(cond.y[:, 1].sum())
    scale = cond.scale[:, 0][:, None, None]
    x0 = torch.from_numpy(outs["0"][:, 0] / scale)[:, None].double()
    y = cond.y.double()
    corrected = (x0 + 0.5 * band_project(y[:, 0:1] - fine * x0, cond.s)) * y[:, 1:2]
    # do no harm: per map, the corrected output only where it agrees at least as well with the acquired band
    def residual(x):
        return band_project(x - y[:, 0:1], cond.s).flatten(1).norm(dim=1)

    keep = (residual(corrected) <= residual(x0))[:, None, None, None]
    expected = np.clip(torch.where(keep, corrected, x0).numpy()[:, 0] * scale, 0.0, None)
    np.testing.assert_allclose(outs[None][:, 0], expected, atol=1e-4 * float(outs["0"].max()))


def test_a_replaced_estimator_is_refused(tiny_model_dir, phantom_subject_dir, tmp_path):
    """fine_mask.safetensors that no longer matches its JSON sidecar: upscale refuses, writes nothing."""
    from typer.testing import CliRunner

    from ftddm_trt.cli.main import app
    from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
    from ftddm_trt.models.io import save_model

    model, _ = _model_with_estimator(tiny_model_dir, tmp_path / "model")
    other = FineMaskNet(FineMaskConfig.preset("tiny"))
    save_model(other, other.config, tmp_path / "other")
    (model / "fine_mask.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    out = tmp_path / "sr"
    res = CliRunner().invoke(
        app,
        [
            "upscale",
            str(phantom_subject_dir),
            "--out", str(out),
            "--sampler",
            "ftddm-dpmpp",
            "--ttrunc",
            "20",
            "--steps",
            "2",
            "--backend",
            "torch",
            "--model",
            str(model),
            "--metabolites",
            "NAA",
        ],
    )
    assert res.exit_code != 0
    assert "fine-mask" in res.output and "sha256" in "".join(res.output.split())
    assert not out.exists()


def test_add_fine_mask_writes_a_model_that_upscale_uses(tiny_model_dir, tmp_path):
    """add_fine_mask on tiny phantom subjects: a complete model folder (the base's networks untouched, the
    estimator hash-recorded, threshold and weight from the grid), refused over an existing folder."""
    from ftddm_trt.atomic import OutputError
    from ftddm_trt.data.phantom import make_subject
    from ftddm_trt.evaluation.fine_mask import THRESHOLDS, WEIGHTS
    from ftddm_trt.models.io import model_sha256
    from ftddm_trt.models.model_set import ModelSet
    from ftddm_trt.training.fine_mask import add_fine_mask

    subjects = [make_subject(i, seed=9, style="patchy") for i in range(3)]
    out = tmp_path / "with_mask"
    manifest = add_fine_mask(
        tiny_model_dir,
        out,
        subjects[:2],
        subjects[2:],
        minutes=0.05,
        command="ftddm-trt add-fine-mask x",
        data={"phantoms": "test"},
        log=None,
    )
    models = ModelSet.open(out)
    net = models.fine_mask_net()
    assert net is not None and net.config.threshold in THRESHOLDS and net.config.consistency_weight in (*WEIGHTS, 0.0)
    fm = manifest["networks"]["fine_mask"]
    assert fm["sha256"] == model_sha256(out / "fine_mask") and fm["training"]["iterations"] >= 1
    assert manifest["commands"][-1] == "ftddm-trt add-fine-mask x"
    assert models.hashes() == ModelSet.open(tiny_model_dir).hashes()
    with pytest.raises(OutputError):
        add_fine_mask(tiny_model_dir, out, subjects[:2], subjects[2:], minutes=0.05, command="x", data={}, log=None)
