"""TDPM baseline: the GAN generator of x_Ttrunc (models.tdpm), its training task, packaging, the pipeline's
``tdpm`` sampler and its ONNX export, with tiny networks."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.examples import SlicePool, random_batch
from ftddm_trt.data.phantom import generate_dataset
from ftddm_trt.diffusion import CosineSchedule
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.models.io import load_model, save_model
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.models.tdpm import TDPMConfig, TDPMDiscriminator, TDPMGenerator
from ftddm_trt.training import run_config
from ftddm_trt.training.tdpm import gan_step, validate_generator

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


@functools.lru_cache(maxsize=None)
def _dataset(n_subjects: int, seed: int = 0, styles=("classic",)):
    return generate_dataset(n_subjects, seed=seed, styles=styles)


@pytest.fixture(autouse=True)
def _fast_dataset(monkeypatch):
    """generate_dataset is deterministic: build the phantoms once for the module (the tdpm task reads
    its subjects through ``run_config.training_subjects``, as every task does)."""
    monkeypatch.setattr(run_config, "generate_dataset",
                        lambda n, seed=0, styles=("classic",): _dataset(n, seed, tuple(styles)))


@pytest.fixture(scope="module")
def pool():
    return SlicePool.from_subjects(_dataset(5)[:1])


def test_generator_shapes_latent_and_io(tmp_path):
    cfg = TDPMConfig.preset("tiny")
    gen, disc = TDPMGenerator(cfg).eval(), TDPMDiscriminator(cfg)
    y, eps = torch.randn(3, 4, 64, 64), torch.randn(3, 1, 64, 64)
    x = gen.reverse(eps, y, torch.ones(3))
    assert x.shape == (3, 1, 64, 64) and disc(x, y).shape == (3, 1, 8, 8)
    # tau_f scales the latent: at tau_f = 0 the draw does not depend on eps
    torch.testing.assert_close(
        gen.reverse(eps, y, torch.zeros(3)), gen.reverse(torch.randn(3, 1, 64, 64), y, torch.zeros(3))
    )
    assert not torch.allclose(gen.reverse(eps, y, torch.ones(3)), gen.reverse(-eps, y, torch.ones(3)))
    save_model(gen, cfg, tmp_path / "g")
    back = load_model(tmp_path / "g")
    torch.testing.assert_close(back.reverse(eps, y, torch.ones(3)), x)
    assert TDPMConfig.preset("cpu").width > cfg.width
    with pytest.raises(ValueError):
        TDPMConfig.preset("huge")


def test_gan_step_moves_the_generator_towards_the_centre(pool):
    """A few hundred steps on one fixed batch: the L1 anchor and the adversarial loss both act."""
    torch.manual_seed(0)
    cfg = TDPMConfig.preset("tiny")
    gen, disc = TDPMGenerator(cfg), TDPMDiscriminator(cfg)
    g_opt, d_opt = (torch.optim.Adam(m.parameters(), lr=3e-3, betas=(0.5, 0.999)) for m in (gen, disc))
    sched = CosineSchedule()
    batch = random_batch(pool, 2, __import__("numpy").random.default_rng(0))
    before = validate_generator(gen, [batch], sched, 100, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    parts = [gan_step(gen, disc, g_opt, d_opt, batch, sched, 100, g, 10.0) for _ in range(20)]
    after = validate_generator(gen, [batch], sched, 100, torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(list(p.values()))).all() for p in parts)
    assert parts[-1]["l1"] < 0.5 * parts[0]["l1"]
    assert after < before


def test_train_task_resumes_and_packages(tmp_path):
    """`train --task tdpm` (tiny, a few iterations, then resumed) and `package-model --tdpm`."""
    run_dir = tmp_path / "run"
    args = ["train", "--out", str(run_dir), "--task", "tdpm", "--preset", "tiny", "--batch-size", "2",
            "--subjects", "5", "--val-every", "100", "--ttrunc", "5"]
    res = runner.invoke(app, [*args, "--iterations", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--iterations", "3"])  # resumes from last/ and last_disc/
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["step"] == 3
    for ckpt in ("last", "last_disc"):
        assert json.loads((run_dir / ckpt / "state.json").read_text())["step"] == 3
    pkg = tmp_path / "pkg"
    res = runner.invoke(app, ["package-model", "--out", str(pkg), "--tdpm", str(run_dir)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["networks"]["tdpm"]["train_config"]["t_trunc"] == 5
    assert isinstance(load_model(pkg / "tdpm"), TDPMGenerator)


def _model_with_tdpm(tiny_model_dir, folder, t_trunc: int = 5):
    """A copy of the tiny model folder plus a tiny TDPM generator recorded for ``t_trunc``."""
    import shutil

    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        shutil.copyfile(f, folder / f.name)
    torch.manual_seed(3)
    cfg = TDPMConfig.preset("tiny")
    save_model(TDPMGenerator(cfg), cfg, folder / "tdpm")
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.setdefault("networks", {})["tdpm"] = {"train_config": {"task": "tdpm", "t_trunc": t_trunc}}
    path.write_text(json.dumps(manifest))
    return folder


def test_tdpm_sampler_and_onnx_export(tiny_model_dir, tmp_path):
    """ModelSet(start="tdpm") serves the generator as the start point: the pipeline's tdpm sampler runs
    generator + truncated chain, and the generator exports to ONNX through the flow's path (with parity)."""
    model = _model_with_tdpm(tiny_model_dir, tmp_path / "model")
    ms = ModelSet.open(model, start="tdpm")
    assert ms.flow_file == "tdpm" and ms.flow_ttrunc() == 5
    with pytest.raises(FileNotFoundError, match="Ttrunc = 5, not 7"):
        ModelSet.open(model, ttrunc=7, start="tdpm")
    with pytest.raises(FileNotFoundError, match="no TDPM generator"):
        ModelSet.open(tiny_model_dir, start="tdpm")

    y = torch.randn(3, 4, 64, 64)
    y[:, 1] = (y[:, 1] > 0).float()
    s = torch.full((3,), 4.0)
    spec = SamplerSpec("tdpm", ttrunc=5)
    assert spec.nfe == 6 and spec.start_network == "tdpm" and SamplerSpec.from_dict(spec.to_dict()) == spec
    x, nfe = sample_images(TorchBackend(ms), spec, y, s, batch_size=2, seed=0)
    assert nfe == 6 and x.shape == (3, 1, 64, 64) and torch.isfinite(x).all()
    assert torch.count_nonzero(x[y[:, 1:2] == 0]) == 0
    # the same chain started from the flow differs: the start point really comes from the generator
    x_flow, _ = sample_images(
        TorchBackend(ModelSet.open(model)), SamplerSpec("ftddm", ttrunc=5), y, s, batch_size=2, seed=0
    )
    assert not torch.allclose(x, x_flow)

    from ftddm_trt.export.onnx_export import export_network, parity_check

    gen = ms.load_torch()["flow"]
    export_network("flow", gen, tmp_path / "tdpm.onnx")
    parity = parity_check("flow", gen, tmp_path / "tdpm.onnx", [], batches=(1, 3))
    assert parity["max_abs_error"] <= parity["atol"]
