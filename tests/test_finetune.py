"""Fine-tuning on a site's own 64 x 64 data: pair-making, refusal of bad folders, resume, end to end."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.examples import SlicePool, pool_stack, prepare_example
from ftddm_trt.data.kspace import kspace_truncate
from ftddm_trt.data.masks import lr_support_mask
from ftddm_trt.data.nifti.files import InputError
from ftddm_trt.data.nifti.write import write_training_subject
from ftddm_trt.data.phantom import make_subject
from ftddm_trt.data.training_folder import folder_sha256, read_training_folder, split_subjects
from ftddm_trt.training.finetune import (
    PASSES_CHOICES,
    QC_WEIGHT_CHOICES,
    recommend_sampler,
    sampler_choices,
    sampler_variant,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    """Three high-resolution subjects of the `smooth` style written as a site's training folder."""
    root = tmp_path_factory.mktemp("site") / "data"
    for i in range(3):
        write_training_subject(root, make_subject(i, 11, style="smooth"))
    return root


@pytest.fixture
def site_copy(site_dir, tmp_path):
    return shutil.copytree(site_dir, tmp_path / "data")


def test_reads_the_subjects_as_written(site_dir):
    subjects = read_training_folder(site_dir)
    truth = make_subject(1, 11, style="smooth")
    got = subjects[1]
    assert [s.subject_id for s in subjects] == ["sub-000", "sub-001", "sub-002"]
    np.testing.assert_allclose(got.maps, truth.maps, atol=1e-5)
    assert np.array_equal(got.masks, truth.masks) and got.qc_source == "qc"
    assert got.t1.shape == truth.t1.shape and np.corrcoef(got.t1.ravel(), truth.t1.ravel())[0, 1] > 0.95
    train, val = split_subjects(subjects, 1)
    assert [s.subject_id for s in val] == ["sub-002"] and len(train) == 2
    assert len(folder_sha256(site_dir)) == 64


def test_pairs_are_made_as_an_acquisition_makes_them(site_dir):
    subj = read_training_folder(site_dir)[0]
    pool = SlicePool.from_subjects([subj])
    k = int(np.argmax(pool.masks.reshape(len(pool), -1).sum(1)))
    stack = pool_stack(pool, k)
    for n in (8, 16, 22):
        hr = prepare_example(stack, n, "hr")
        lr = prepare_example(stack, n, "lr")
        _, zf = kspace_truncate(pool.maps[k] * pool.masks[k], n)  # truncation of the quality-filtered truth
        np.testing.assert_allclose(hr.zero_filled, zf, atol=1e-5)
        assert np.array_equal(hr.mask > 0, pool.masks[k])  # hr: the 64 x 64 quality mask
        lr_nn, _ = kspace_truncate(pool.maps[k] * pool.masks[k], n)  # lr: M from the acquired map, as upscale makes it
        assert np.array_equal(lr.mask > 0, lr_support_mask(lr_nn))


def _refusal(root, match):
    with pytest.raises(InputError, match=match):
        read_training_folder(root)


def test_refuses_a_folder_with_fewer_than_two_subjects(site_copy):
    for extra in ("sub-001", "sub-002"):
        shutil.rmtree(site_copy / extra)
    _refusal(site_copy, "1 subject folder")


def test_refuses_maps_not_acquired_at_64(site_copy, tmp_path):
    write_lr = tmp_path / "lr"
    from ftddm_trt.data.nifti.write import write_phantom_subject

    write_phantom_subject(write_lr, make_subject(0, 11), 16)
    shutil.rmtree(site_copy / "sub-000")
    shutil.copytree(write_lr / "sub-000", site_copy / "sub-000")
    _refusal(site_copy, r"tCr\.nii\.gz.*in-plane size 16 x 16")


def test_refuses_mixed_grids(site_copy):
    p = site_copy / "sub-001" / "concs" / "raw" / "NAA.nii.gz"
    img = nib.load(str(p))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), str(p))
    _refusal(site_copy, r"NAA\.nii\.gz.*differs")


def test_refuses_missing_anatomy(site_copy):
    (site_copy / "sub-002" / "flair.nii.gz").unlink()
    _refusal(site_copy, r"sub-002/flair\.nii\.gz.*missing")


def test_refuses_empty_masks(site_copy):
    p = site_copy / "sub-000" / "masks" / "Gly.nii.gz"
    img = nib.load(str(p))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(p))
    _refusal(site_copy, "quality mask of Gly is empty")
    shutil.rmtree(site_copy / "sub-000" / "qc")
    _refusal(site_copy, "masks/Gly is empty")


def test_refuses_a_subject_without_quality_information(site_copy):
    shutil.rmtree(site_copy / "sub-001" / "qc")
    shutil.rmtree(site_copy / "sub-001" / "masks")
    _refusal(site_copy, "no quality information")


def test_masks_alone_are_enough(site_copy):
    sub = site_copy / "sub-001"
    truth = make_subject(1, 11, style="smooth")
    shutil.rmtree(sub / "qc")
    got = read_training_folder(site_copy)[1]
    assert got.qc_source == "masks" and np.array_equal(got.masks, truth.masks)
    assert np.array_equal(got.snr > 0, truth.masks)  # synthesized qc: passes exactly inside the mask


def test_finetune_validates_the_qc_step_in_the_site_convention(site_dir, tiny_model_dir, tmp_path, monkeypatch):
    """The validation writes the held-out subjects' qc maps in the site's convention (all of them for
    `any`) and passes them to the scoring; an unknown convention is refused by name."""
    from ftddm_trt.data.qc_conventions import CONVENTIONS
    from ftddm_trt.training import finetune as ft_module
    from ftddm_trt.training.finetune import FinetuneConfig

    cfg = FinetuneConfig(data_dir=site_dir, out_model=tmp_path / "m", qc_convention="min")
    assert cfg.validation_conventions == ("min",)
    every = FinetuneConfig(data_dir=site_dir, out_model=tmp_path / "m").validation_conventions
    assert set(every) == set(CONVENTIONS) - {"strict-thresholds"}
    with pytest.raises(ValueError, match="unknown qc convention"):
        FinetuneConfig(data_dir=site_dir, out_model=tmp_path / "m", qc_convention="lcmodel")
    seen = []

    def fake_score_maps(backend, pool, idx, variants, n, protocol, **kw):
        seen.append(tuple(kw["conventions"]))
        row = {"psnr": 1.0, "ssim": 0.5, "psnr_gain": 0.0, "spec": {"passes": 1}, "qc_consistency": 0.0}
        return [row] * (len(variants) + 1)

    monkeypatch.setattr("ftddm_trt.evaluation.generalization.score_maps", fake_score_maps)
    quality = ft_module.validation_quality(tiny_model_dir, {}, read_training_folder(site_dir)[-1:], cfg)
    assert seen and all(c == ("min",) for c in seen) and quality["qc_conventions"] == ["min"]


@pytest.mark.e2e
def test_finetune_end_to_end_resumes_and_its_model_upscales(site_dir, tiny_model_dir, phantom_subject_dir, tmp_path):
    out = tmp_path / "tuned"
    args = ["finetune", "--data", str(site_dir), "--out", str(out), "--model", str(tiny_model_dir), "--minutes", "0.05",
            "--val-subjects", "1", "--networks", "unet,flow", "--qc-convention", "sample-hz-7t"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    ft = manifest["finetune"]
    assert ft["qc_convention"] == "sample-hz-7t" and ft["validation_quality"]["qc_conventions"] == ["sample-hz-7t"]
    assert ft["data_sha256"] == folder_sha256(site_dir) and ft["subjects"]["validation"] == ["sub-002"]
    assert "ftddm-trt finetune" in manifest["commands"][0]
    assert {"unet", "flow", "unet_full"} <= set(manifest["networks"]) and manifest["networks"]["unet_full"]["from_base"]
    assert set(ft["validation_quality"]["s=4"]) == {"zero-filled", "base", "finetuned", "choices"}
    assert len(ft["validation_quality"]["s=4"]["choices"]) == len(PASSES_CHOICES) * len(QC_WEIGHT_CHOICES)
    assert ft["validation_quality"]["recommended"] == recommend_sampler(ft["validation_quality"])
    assert "--passes" in res.output
    steps = ft["training"]["unet"]["step"]
    assert steps >= 1

    # re-running continues the same runs within one total budget (a larger --minutes gives more steps)
    # and replaces the model folder only with --force
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "not empty" in " ".join(res.output.split())  # rich wraps long paths
    minutes = args.index("--minutes") + 1
    longer = [*args[:minutes], "0.1", *args[minutes + 1:]]
    res = CliRunner().invoke(app, longer + ["--force"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    unet = manifest["finetune"]["training"]["unet"]
    assert unet["step"] > steps and unet["seconds_total"] < 0.1 * 60 * 1.2 + 5  # not a fresh 6 s on top

    sr = tmp_path / "sr"
    res = CliRunner().invoke(
        app, ["upscale", str(phantom_subject_dir), "--out", str(sr), "--model", str(out), "--backend", "torch",
              "--steps", "2"]
    )
    assert res.exit_code == 0, res.output
    run = json.loads((sr / "run.json").read_text())
    assert any(v == manifest["networks"]["unet"]["sha256"] for v in json.dumps(run).split('"'))


def test_finetune_default_tunes_the_unet_and_keeps_the_base_flow(site_dir, tiny_model_dir, tmp_path):
    """Default networks: the UNet alone (a fine-tuned flow over-fitted a few subjects, docs/fine-tuning.md); the flow
    is the base's, bit for bit, and marked as copied."""
    out = tmp_path / "tuned"
    res = CliRunner().invoke(
        app,
        [
            "finetune",
            "--data", str(site_dir),
            "--out", str(out),
            "--model",
            str(tiny_model_dir),
            "--minutes",
            "0.05",
            "--val-subjects",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    base_sha = {
        n: hashlib.sha256((tiny_model_dir / f"{n}.safetensors").read_bytes()).hexdigest() for n in ("unet", "flow")
    }
    assert list(manifest["finetune"]["training"]) == ["unet"] and "--networks unet" in manifest["commands"][0]
    assert manifest["networks"]["flow"]["from_base"] and not manifest["networks"]["unet"].get("from_base")
    assert manifest["networks"]["flow"]["sha256"] == base_sha["flow"]
    assert hashlib.sha256((out / "flow.safetensors").read_bytes()).hexdigest() == base_sha["flow"]
    assert manifest["networks"]["unet"]["sha256"] != base_sha["unet"]


def test_finetune_refuses_bad_data_before_training(site_copy, tiny_model_dir, tmp_path):
    (site_copy / "sub-000" / "t1.nii.gz").unlink()
    res = CliRunner().invoke(app, ["finetune", "--data", str(site_copy), "--out", str(tmp_path / "m"),
                                   "--model", str(tiny_model_dir), "--minutes", "1", "--val-subjects", "1"])
    text = res.output.replace("\n", "")
    assert res.exit_code != 0 and "sub-000/t1.nii.gz" in text and "missing" in text
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.runs").exists()


@pytest.mark.slow
def test_finetune_under_torchrun_writes_one_model_from_rank_0(site_dir, tiny_model_dir, tmp_path):
    """Two processes (gloo) fine-tune the networks in turn; rank 0 alone scores and writes the folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "tuned"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ftddm_trt.cli.main",
        "finetune",
        "--data", str(site_dir),
        "--out", str(out),
        "--model",
        str(tiny_model_dir),
        "--minutes",
        "0.05",
        "--val-subjects",
        "1",
        "--networks",
        "unet,flow",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finetune"]["training"]["unet"]["step"] >= 1 and "s=4" in manifest["finetune"]["validation_quality"]
    assert (res.stdout + res.stderr).count("wrote ") == 1  # one rank reported the folder


def test_cli_finetune_defaults_are_the_configs():
    """`ftddm-trt finetune --help` shows FinetuneConfig's defaults: both read training.finetune_defaults."""
    import inspect

    from ftddm_trt.cli.train import finetune_cmd
    from ftddm_trt.training.finetune import FinetuneConfig

    options = {name: p.default.default for name, p in inspect.signature(finetune_cmd).parameters.items()}
    cfg = FinetuneConfig(data_dir=Path("site"), out_model=Path("out"))
    assert options["minutes"] == cfg.minutes
    assert tuple(options["networks"].split(",")) == cfg.networks
    assert options["learning_rate"] == cfg.lr
    assert options["lr_mask_fraction"] == cfg.lr_fraction
    assert options["fine_mask_share"] == cfg.fine_mask_share
    assert options["margin_weight"] == cfg.margin_weight
    assert options["val_subjects"] == cfg.val_subjects


def test_recommend_sampler_takes_the_best_mean_gain_over_s_8_and_4():
    def quality(gains8, gains4):
        keys = [(1, 0.2), (1, 0.0), (2, 0.2), (2, 0.0)]
        return {
            f"s={k}": {
                "choices": [{"passes": p, "qc_consistency": w, "psnr_gain": g} for (p, w), g in zip(keys, gains)]
            }
            for k, gains in ((8, gains8), (4, gains4))
        }

    rec = recommend_sampler(quality([3.0, 3.1, 3.4, 3.2], [4.0, 4.2, 4.1, 4.6]))
    assert (rec["passes"], rec["qc_consistency"]) == (2, 0.0) and rec["psnr_gain"] == pytest.approx(3.9)
    # a tie keeps the first (the default), and no choices recommend nothing
    rec = recommend_sampler(quality([3.0, 3.0, 3.0, 3.0], [4.0, 4.0, 4.0, 4.0]))
    assert (rec["passes"], rec["qc_consistency"]) == (1, 0.2)
    assert recommend_sampler({"maps": 0}) == {}


def test_sampler_choices_cover_the_grid_once_with_the_default_first():
    from ftddm_trt.evaluation.generalization import DEFAULT_VARIANTS

    default = DEFAULT_VARIANTS[0]
    choices = sampler_choices(default)
    assert choices[0] == default
    grid = {(v.spec.passes, v.qc_weight) for v in choices}
    assert grid == {(p, w) for p in PASSES_CHOICES for w in QC_WEIGHT_CHOICES} and len(choices) == len(grid)
    assert all(v.spec.tau_f == default.spec.tau_f and v.spec.steps == default.spec.steps for v in choices)


def test_sampler_variant_changes_only_passes_and_qc_weight():
    from dataclasses import asdict

    from ftddm_trt.evaluation.generalization import DEFAULT_VARIANTS

    default = DEFAULT_VARIANTS[0]
    v = sampler_variant(default, 3, 0.0)
    assert (v.spec.passes, v.qc_weight, v.label) == (3, 0.0, "passes 3, qc 0")
    assert v.spec.nfe == 3 * default.spec.nfe - 2  # 3 x steps + 1 flow call
    same = {k: x for k, x in asdict(v.spec).items() if k != "passes"}
    assert same == {k: x for k, x in asdict(default.spec).items() if k != "passes"}
    assert sampler_variant(default, 2, 0.2, label="chosen").label == "chosen"


def test_finetune_tunes_the_base_fine_mask_estimator(site_dir, tiny_model_dir, tmp_path):
    """A base with a fine-mask estimator: finetune trains it on the site's masks for its share of the budget,
    chooses its threshold and weight on the validation subject, and packages it (hash-recorded)."""
    import torch

    from ftddm_trt.evaluation.fine_mask import THRESHOLDS, WEIGHTS
    from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
    from ftddm_trt.models.io import model_sha256, save_model
    from ftddm_trt.models.model_set import ModelSet

    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    torch.manual_seed(0)
    cfg = FineMaskConfig.preset("tiny")
    save_model(FineMaskNet(cfg), cfg, base / "fine_mask")
    out = tmp_path / "tuned"
    res = CliRunner().invoke(app, ["finetune", "--data", str(site_dir), "--out", str(out), "--model", str(base),
                                   "--minutes", "0.1", "--val-subjects", "1"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    ft = manifest["finetune"]
    assert ft["training"]["fine_mask"]["iterations"] >= 1 and ft["fine_mask_share"] == 0.1
    assert not manifest["networks"]["fine_mask"].get("from_base")
    assert (
        manifest["networks"]["fine_mask"]["sha256"]
        == model_sha256(out / "fine_mask")
        != model_sha256(base / "fine_mask")
    )
    chosen = ft["validation_quality"]["fine_mask"]
    net = ModelSet.open(out).fine_mask_net()
    assert (net.config.threshold, net.config.consistency_weight) == (chosen["threshold"], chosen["weight"])
    assert chosen["threshold"] in THRESHOLDS and chosen["weight"] in (*WEIGHTS, 0.0)
