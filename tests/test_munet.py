"""MUNet-FS-cWGAN and Flow Enhancer baselines: the networks (models.munet, models.flow_enhancer), the
critic's gradient penalty, their training tasks (resumable) and packaging, with tiny networks."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ftddm_trt.cli.main import app
from ftddm_trt.data.examples import SlicePool, random_batch
from ftddm_trt.data.phantom import generate_dataset
from ftddm_trt.models.flow_enhancer import EnhancerReverse, FlowEnhancer, FlowEnhancerConfig, enhancer_condition
from ftddm_trt.models.io import load_model, model_kind, save_model
from ftddm_trt.models.munet import MUNet, MUNetConfig, MUNetCritic, gradient_penalty, im2col
from ftddm_trt.training import run_config
from ftddm_trt.training.munet import resolve_munet_weights, validate_munet, wgan_step

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


@functools.lru_cache(maxsize=None)
def _dataset(n_subjects: int, seed: int = 0, styles=("classic",)):
    return generate_dataset(n_subjects, seed=seed, styles=styles)


@pytest.fixture(autouse=True)
def _fast_dataset(monkeypatch):
    """Build the phantoms once for the module (every task reads them through ``run_config.training_subjects``)."""
    monkeypatch.setattr(run_config, "generate_dataset",
                        lambda n, seed=0, styles=("classic",): _dataset(n, seed, tuple(styles)))


def _condition(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(b, 4, size, size, generator=g)
    y[:, 1] = (y[:, 1] > 0.3).float()
    return y


# ------------------------------------------------------------------------------------------ networks


def test_munet_shapes_mask_and_weights_round_trip(tmp_path):
    cfg = MUNetConfig.preset("tiny")
    net, critic = MUNet(cfg).eval(), MUNetCritic(cfg)
    y, s = _condition(3, 16), torch.tensor([2.0, 4.0, 8.0])
    x = net(y, s)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    assert torch.count_nonzero(x[y[:, 1:2] == 0]) == 0  # zero outside M
    assert critic(x, y).shape == (3,)
    meta = save_model(net, cfg, tmp_path / "munet")
    assert meta["kind"] == "munet" and model_kind(critic) == "munet_critic"
    torch.testing.assert_close(load_model(tmp_path / "munet")(y, s), x)
    assert MUNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="encoders"):
        MUNetConfig(encoders=("map", "pet"))
    with pytest.raises(ValueError):
        MUNetConfig.preset("huge")


def test_paper_presets_have_the_papers_parameter_counts():
    """Table 1: MUNet-FS-cWGAN 27.5 M; Flow Enhancer 37.6 M, read as MUNet + the enhancer's flow."""
    from ftddm_trt.models.unet import count_parameters

    with torch.device("meta"):
        munet = count_parameters(MUNet(MUNetConfig.preset("paper")))
        flow = count_parameters(FlowEnhancer(FlowEnhancerConfig.preset("paper")))
    assert abs(munet / 1e6 - 27.5) < 0.5
    assert abs((munet + flow) / 1e6 - 37.6) < 0.5


def test_filter_scaled_conv_is_a_convolution_with_scaled_filters():
    """im2col + batched matmul = F.conv2d with each image's filters w * (1 + a(s))."""
    from ftddm_trt.models.munet import FilterScaledConv2d

    torch.manual_seed(0)
    conv = FilterScaledConv2d(3, 5, latent_dim=4)
    x, code = torch.randn(2, 3, 7, 7), torch.randn(2, 4)
    out = conv(x, code)
    scales = conv.scales(code)
    for b in range(2):
        ref = F.conv2d(x[b : b + 1], conv.weight * scales[b][:, :, None, None], padding=1)
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)
    assert im2col(x, 3).shape == (2, 27, 49)


def test_filter_scaling_changes_the_output_with_s():
    """The same condition at another upscaling factor gives another map; one batch may mix factors."""
    torch.manual_seed(0)
    net = MUNet(MUNetConfig.preset("tiny")).eval()
    y = _condition(1, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(y, torch.tensor([2.0, 8.0]))
        single = net(y[:1], torch.tensor([8.0]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(out[1:], single, atol=1e-5, rtol=1e-5)
    # the s code reaches the output only through the scaling heads: with their weights zeroed, s no longer matters
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "head"):
                m.head.weight.zero_()
        out = net(y, torch.tensor([2.0, 8.0]))
    torch.testing.assert_close(out[0], out[1])


class _Linear(torch.nn.Module):
    """critic(x, y) = <w, x> + <v, y>: its gradient in x is w everywhere."""

    def __init__(self, size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(1, 1, size, size, generator=g) * 0.2)
        self.v = torch.nn.Parameter(torch.randn(1, 4, size, size, generator=g))

    def forward(self, x, y):
        return (x * self.w).flatten(1).sum(1) + (y * self.v).flatten(1).sum(1)


def test_gradient_penalty_closed_form_for_a_linear_critic():
    critic = _Linear(4)
    real, fake, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 4, 4, 4)
    gp = gradient_penalty(critic, real, fake, y, torch.rand(3))
    want = (critic.w.detach().norm() - 1.0) ** 2
    torch.testing.assert_close(gp.detach(), want)
    gp.backward()  # differentiable in the critic's parameters: d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    w = critic.w.detach()
    torch.testing.assert_close(critic.w.grad, 2 * (w.norm() - 1) * w / w.norm())


def test_gradient_penalty_matches_finite_differences_on_a_tiny_critic():
    """The penalty's gradient norm at the interpolate equals the central-difference gradient (float64)."""
    torch.manual_seed(0)
    critic = MUNetCritic(MUNetConfig.preset("tiny").replace(image_size=8)).double()
    real, fake = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y, alpha = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    gp = float(gradient_penalty(critic, real, fake, y, alpha).detach())
    x_hat = alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake
    h, norms = 1e-6, []
    with torch.no_grad():
        for b in range(2):
            grad = torch.zeros(64, dtype=torch.float64)
            for i in range(64):
                d = torch.zeros(1, 1, 8, 8, dtype=torch.float64).view(-1)
                d[i] = h
                d = d.view(1, 1, 8, 8)
                up = critic(x_hat[b : b + 1] + d, y[b : b + 1])
                down = critic(x_hat[b : b + 1] - d, y[b : b + 1])
                grad[i] = (up - down).item() / (2 * h)
            norms.append(float(grad.norm()))
    assert gp == pytest.approx(float(np.mean([(n - 1.0) ** 2 for n in norms])), rel=1e-6, abs=1e-9)


def test_flow_enhancer_is_invertible_and_saves_as_its_own_kind(tmp_path):
    torch.manual_seed(0)
    cfg = FlowEnhancerConfig.preset("tiny")
    assert cfg.cond_in_channels == 5 and cfg.prior == "learned" and cfg.image_size == 16
    enh = FlowEnhancer(cfg)
    with torch.no_grad():  # move every zero-initialised layer off the identity
        for p in enh.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enh.eval()
    x, y, xm = torch.rand(2, 1, 16, 16), _condition(2, 16), torch.rand(2, 1, 16, 16)
    cond = enhancer_condition(y, xm)
    assert cond.shape == (2, 5, 16, 16) and torch.count_nonzero(cond[:, 4:][y[:, 1:2] == 0]) == 0
    eps, logdet = enh(x, cond)
    back = enh.reverse(eps, cond, torch.ones(2))
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(EnhancerReverse(enh)(eps, y, xm, torch.ones(2)), back)
    assert torch.isfinite(logdet).all() and torch.isfinite(enh.nll(x, cond)).all()
    meta = save_model(enh, cfg, tmp_path / "flow_enhancer")
    assert meta["kind"] == "flow_enhancer"
    loaded = load_model(tmp_path / "flow_enhancer")
    assert type(loaded) is FlowEnhancer and loaded.config == cfg
    torch.testing.assert_close(loaded.enhance(eps, y, xm, torch.ones(2)), back)
    with pytest.raises(ValueError, match="5 channels"):
        FlowEnhancer(cfg.replace(cond_in_channels=4))


# ------------------------------------------------------------------------------------------ training


def test_wgan_step_trains_generator_and_critic():
    """A few steps on one fixed batch: finite losses, and the pixel loss comes down."""
    torch.manual_seed(0)
    pool = SlicePool.from_subjects(_dataset(5)[:1])
    mcfg = MUNetConfig.preset("tiny").replace(image_size=64)
    gen, critic = MUNet(mcfg), MUNetCritic(mcfg)
    g_opt, c_opt = (torch.optim.Adam(m.parameters(), lr=3e-3, betas=(0.5, 0.9)) for m in (gen, critic))
    batch = random_batch(pool, 2, np.random.default_rng(0))
    cfg = run_config.TrainConfig(task="munet", preset="tiny", critic_steps=2)
    before = validate_munet(gen, [batch], cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    parts = [wgan_step(gen, critic, g_opt, c_opt, batch, g, cfg) for _ in range(8)]
    assert all(np.isfinite(list(p.values())).all() for p in parts)
    assert validate_munet(gen, [batch], cfg, torch.device("cpu")) < before


def _train(args: list[str], iterations: int):
    res = runner.invoke(app, [*args, "--iterations", str(iterations)])
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def test_munet_and_flow_enhancer_tasks_resume_and_package(tmp_path):
    """`train --task munet`, then `--task flow_enhancer --munet RUN` (tiny, 2 iterations then resumed to 3),
    and `package-model --munet --flow-enhancer`; the enhancer refuses another MUNet."""
    common = ["--preset", "tiny", "--batch-size", "2", "--subjects", "5", "--val-every", "2", "--val-subjects", "1"]
    munet_run = tmp_path / "munet"
    args = ["train", "--out", str(munet_run), "--task", "munet", *common]
    _train(args, 2)
    assert _train(args, 3)["step"] == 3  # resumed from last/ and last_critic/
    for ckpt in ("last", "last_critic"):
        assert json.loads((munet_run / ckpt / "state.json").read_text())["step"] == 3
    assert resolve_munet_weights(munet_run) == munet_run / "best"

    enh_run = tmp_path / "enhancer"
    args = ["train", "--out", str(enh_run), "--task", "flow_enhancer", "--munet", str(munet_run), *common]
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--task", "flow_enhancer", *common])
    assert res.exit_code != 0 and "--munet" in res.output
    _train(args, 2)
    assert _train(args, 3)["step"] == 3
    state = json.loads((enh_run / "last" / "state.json").read_text())
    assert state["config"]["extra"]["munet_sha256"]
    assert type(load_model(enh_run / "best")) is FlowEnhancer

    pkg = tmp_path / "pkg"
    res = runner.invoke(app, ["package-model", "--out", str(pkg), "--flow-enhancer", str(enh_run)])
    assert res.exit_code != 0 and "MUNet" in res.output  # the enhancer's MUNet must come along
    res = runner.invoke(app, ["package-model", "--out", str(pkg), "--munet", str(munet_run),
                              "--flow-enhancer", str(enh_run)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert set(manifest["networks"]) == {"munet", "flow_enhancer"}
    assert isinstance(load_model(pkg / "munet"), MUNet)

    # another MUNet's weights: the resumed enhancer run refuses them
    other = tmp_path / "other"
    other.mkdir()
    cfg = MUNetConfig.preset("tiny").replace(image_size=64)
    save_model(MUNet(cfg), cfg, other / "munet")
    res = runner.invoke(app, ["train", "--out", str(enh_run), "--task", "flow_enhancer", "--munet", str(other),
                              *common, "--iterations", "4"])
    assert res.exit_code != 0 and "sha256" in "".join(res.output.split())

    # the same MUNet in another folder (a moved checkout): the hash matches, the run resumes from there
    moved = tmp_path / "moved" / "munet"
    shutil.copytree(munet_run, moved)
    args = ["train", "--out", str(enh_run), "--task", "flow_enhancer", "--munet", str(moved), *common]
    assert _train(args, 4)["step"] == 4
    assert json.loads((enh_run / "last" / "state.json").read_text())["config"]["munet"] == str(moved)


def test_resumed_munet_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    """Every draw of step k is seeded by (seed, k) and both Adam states are saved: a run killed after its
    step-2 checkpoint and resumed ends with the weights of an uninterrupted 4-step run."""
    from safetensors.torch import load_file

    from ftddm_trt.training import munet as munet_training

    cfg = run_config.TrainConfig(task="munet", preset="tiny", iterations=4, batch_size=2, n_subjects=5, val_every=10,
                                 val_examples=2, ckpt_every=2, lr=1e-3, lr_final=1e-4)
    munet_training.train_munet(cfg, tmp_path / "straight", device="cpu", progress=False)

    real_save = munet_training.save_checkpoint

    def save_then_die(folder, model, mcfg, opt, state, **kw):
        real_save(folder, model, mcfg, opt, state, **kw)
        if state["step"] == 2 and folder.name == "last":  # the critic is saved first, the generator last
            raise KeyboardInterrupt

    monkeypatch.setattr(munet_training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        munet_training.train_munet(cfg, tmp_path / "resumed", device="cpu", progress=False)
    monkeypatch.setattr(munet_training, "save_checkpoint", real_save)
    assert munet_training.train_munet(cfg, tmp_path / "resumed", device="cpu", progress=False)["step"] == 4
    for ckpt in ("last", "last_critic"):
        a = load_file(str(tmp_path / "straight" / ckpt / "model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / ckpt / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=f"{ckpt}: {k}")
