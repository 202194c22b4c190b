"""The distilled sampler: DDIM math against a closed form and diffusers, the spec, the model folder, and
`ftddm-trt distill` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.diffusion import CosineSchedule, distilled_sample, distilled_timesteps
from ftddm_trt.engine.pipeline import SamplerSpec
from ftddm_trt.models.model_set import DISTILLED_DIR, ModelSet, distilled_folder, distilled_steps
from ftddm_trt.training.distill import DistillConfig, distill, package_distilled
from ftddm_trt.workflows.upscale import UpscaleOptions, check_options, resolve_sampler

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


def test_timesteps_are_even_and_descending():
    assert distilled_timesteps(100, 1) == [100]
    assert distilled_timesteps(100, 2) == [100, 50]
    assert distilled_timesteps(100, 3) == [100, 67, 33]
    with pytest.raises(ValueError):
        distilled_timesteps(2, 3)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_an_oracle_student_lands_on_x0_exactly(steps):
    """Closed form: with the true noise of x_t = sqrt(g) x0 + sqrt(1-g) e, every DDIM step keeps the same
    (x0, e) pair, so the chain returns x0 whatever the steps."""
    sched = CosineSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 1, 8, 8, generator=g,
                                                                                   dtype=torch.float64)

    def oracle(x_t, t):
        gt = sched.gammas[int(t[0])]
        return (x_t - gt.sqrt() * x0) / (1 - gt).sqrt()

    x_start = sched.gammas[100].sqrt() * x0 + (1 - sched.gammas[100]).sqrt() * e
    res = distilled_sample(oracle, x_start, None, sched, distilled_timesteps(100, steps))
    assert res.nfe == steps
    torch.testing.assert_close(res.x0, x0, rtol=0, atol=1e-10)


def test_two_steps_match_diffusers_ddim():
    """diffusers' DDIMScheduler (eta = 0, the same cosine betas; its 0-based t is our t - 1) with a fixed
    non-oracle noise function: step 99 -> 49 -> final (alpha 1) equals our chain [100, 50]."""
    from diffusers import DDIMScheduler

    sched = CosineSchedule(1000)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                        set_alpha_to_one=True, prediction_type="epsilon")
    ref.set_timesteps(20)  # stride 1000 // 20 = 50
    w = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64).reshape(1, 1, 8, 8)

    def eps_fn(x_t, t):
        return 0.3 * x_t + w * t.to(torch.float64).reshape(-1, 1, 1, 1) / 100

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = distilled_sample(eps_fn, x, None, sched, [100, 50]).x0
    y = x
    for t0 in (99, 49):
        y = ref.step(eps_fn(y, torch.full((2,), float(t0 + 1))), t0, y, eta=0.0).prev_sample
    torch.testing.assert_close(ours, y, rtol=1e-6, atol=1e-6)


def test_spec_counts_the_flow_and_refuses_more_than_three_steps():
    spec = SamplerSpec("ftddm-distilled")
    assert spec.n_steps == 1 and spec.nfe == 2 and spec.uses_flow and spec.distilled_unet
    assert SamplerSpec("ftddm-distilled", steps=3, tau_f=0.0).nfe == 4
    assert SamplerSpec("ftddm-distilled", tau_f=0.0).deterministic
    with pytest.raises(ValueError, match="at most 3"):
        SamplerSpec("ftddm-distilled", steps=4)
    assert SamplerSpec.from_dict(spec.to_dict()) == spec


def test_a_model_without_distilled_folder_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="ftddm-trt distill"):
        distilled_folder(tmp_path)


def _fake_student(model, steps=2, teacher_unet=None):
    """A copy of ``model`` as its distilled/ folder, with a distilled record naming ``teacher_unet``."""
    import shutil

    folder = model / DISTILLED_DIR
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns(DISTILLED_DIR))
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    hashes = ModelSet.open(model).hashes()
    manifest["distilled"] = {"steps": steps, "teacher_sha256": {**hashes, "unet": teacher_unet or hashes["unet"]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_auto_runs_the_student_only_where_it_can(tiny_model_dir, tmp_path):
    """--sampler auto: ftddm-distilled (at the student's trained steps) for a model with a student of its own
    networks read from its folder; the solver for no student, a student of another UNet, an export, a server,
    or a solver option; a named sampler is kept."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert resolve_sampler(UpscaleOptions(model=model)) == (
        "ftddm-dpmpp", "auto: ftddm-dpmpp, as the model has no distilled student")
    _fake_student(model, steps=2)
    assert distilled_steps(distilled_folder(model)) == 2
    name, why = resolve_sampler(UpscaleOptions(model=model))
    assert name == "ftddm-distilled" and why.startswith("auto: ftddm-distilled")
    spec = check_options(UpscaleOptions(model=model, backend="torch"))
    assert spec.name == "ftddm-distilled" and spec.n_steps == 2 and spec.nfe == 3
    assert check_options(UpscaleOptions(model=model, sampler="ftddm-distilled", steps=1)).n_steps == 1
    for opts, reason in ((UpscaleOptions(model=model, steps=2, ttrunc=20), "solver option"),
                         (UpscaleOptions(model=model, passes=2), "solver option"),
                         (UpscaleOptions(model=model, backend="triton", url="localhost:1"), "a server"),
                         (UpscaleOptions(model=model, onnx=tmp_path / "onnx"), "an export")):
        name, why = resolve_sampler(opts)
        assert name == "ftddm-dpmpp" and reason in why, why
    assert resolve_sampler(UpscaleOptions(model=model, sampler="ftddm")) == ("ftddm", "--sampler ftddm")
    shutil.rmtree(model / DISTILLED_DIR)
    _fake_student(model, teacher_unet="0" * 64)
    name, why = resolve_sampler(UpscaleOptions(model=model))
    assert name == "ftddm-dpmpp" and "another UNet" in why


@pytest.mark.e2e
def test_distill_then_upscale_with_the_student(tiny_model_dir, subject_copy, tmp_path):
    """A tiny teacher distilled for a few seconds: the student starts at the teacher's UNet, the packaged
    folder carries the distilled record and the flow, and `upscale --sampler ftddm-distilled` finds it as
    MODEL/distilled and runs it in 2 NFE; without it, upscale refuses naming the command."""
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model_dir, model)
    res = runner.invoke(app, ["upscale", str(subject_copy), "--out", str(tmp_path / "no"), "--backend", "torch",
                              "--model", str(model), "--sampler", "ftddm-distilled", "--metabolites", "Gly"])
    assert res.exit_code != 0 and "ftddm-trt distill" in res.output
    cfg = DistillConfig(minutes=0.05, bank_maps=8, val_maps=4, n_subjects=5, val_every=2, ckpt_every=2)
    summary = distill(model, tmp_path / "work", cfg, log=lambda _m: None, progress=False)
    assert summary["steps"] >= 1 and summary["best_val"] < float("inf")
    manifest = package_distilled(model, tmp_path / "work", model / DISTILLED_DIR, cfg)
    assert manifest["distilled"]["steps"] == 1 and manifest["distilled"]["sampler"]["nfe"] == 2
    assert {"unet", "flow"} <= set(manifest["networks"]) and "unet_full" not in manifest["networks"]
    assert distilled_folder(model) == model / DISTILLED_DIR
    out = tmp_path / "sr"
    res = runner.invoke(app, ["upscale", str(subject_copy), "--out", str(out), "--backend", "torch", "--model",
                              str(model), "--sampler", "ftddm-distilled", "--metabolites", "Gly"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["nfe"] == 2 and record["sampler"]["name"] == "ftddm-distilled"
    out = tmp_path / "auto"  # the default sampler is the student now that the model has one
    res = runner.invoke(app, ["upscale", str(subject_copy), "--out", str(out), "--backend", "torch", "--model",
                              str(model), "--metabolites", "Gly"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "run.json").read_text())
    assert record["sampler"]["name"] == "ftddm-distilled" and record["sampler_choice"].startswith("auto:")
