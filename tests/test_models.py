"""Tests of ftddm_trt.models: UNet, conditional flow, configs, weight files, ONNX export (tiny configs)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ftddm_trt.models import (
    ConditionalFlow,
    DenoisingUNet,
    FlowConfig,
    FlowReverse,
    UNetConfig,
    count_parameters,
    load_config,
    load_model,
    model_sha256,
    save_model,
    squeeze2d,
    unsqueeze2d,
)
from ftddm_trt.models.flow import ActNorm, InvConv1x1

# ---------------------------------------------------------------------------------------- helpers


def _perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter (zero-initialised layers included) so that every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _tiny_unet_inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = UNetConfig.preset("tiny").image_size
    x = torch.randn(b, 1, s, s, generator=g)
    y = torch.randn(b, 4, s, s, generator=g)
    t = torch.linspace(1.0, 1000.0, b)
    sc = torch.linspace(2.0, 8.0, b)
    return x, y, t, sc


def _tiny_flow(dtype=torch.float32, seed: int = 0) -> ConditionalFlow:
    torch.manual_seed(seed)
    f = ConditionalFlow(FlowConfig.preset("tiny"))
    _perturb(f, 0.1, seed)
    return f.to(dtype).eval()


def _tiny_flow_inputs(b: int = 3, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = FlowConfig.preset("tiny").image_size
    x = torch.randn(b, 1, s, s, generator=g, dtype=dtype)
    y = torch.randn(b, 4, s, s, generator=g, dtype=dtype)
    return x, y


# ---------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["paper", "cpu", "tiny"])
def test_config_dict_roundtrip(name):
    for cls in (UNetConfig, FlowConfig):
        cfg = cls.preset(name)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert cls.from_dict(d) == cfg


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError):
        UNetConfig.from_dict({"nonsense": 1})
    with pytest.raises(ValueError):
        FlowConfig(image_size=12, levels=3)
    with pytest.raises(ValueError):
        UNetConfig.preset("huge")


def test_paper_presets_param_counts():
    n_unet = count_parameters(DenoisingUNet(UNetConfig.preset("paper")))
    n_flow = count_parameters(ConditionalFlow(FlowConfig.preset("paper")))
    assert abs(n_unet - 30.3e6) <= 0.15 * 30.3e6
    assert abs(n_flow - 20.2e6) <= 0.15 * 20.2e6
    assert 1.5e6 <= count_parameters(DenoisingUNet(UNetConfig.preset("cpu"))) <= 3e6


def test_paper_flow_latents_pack_to_4096():
    cfg = FlowConfig.preset("paper")
    assert cfg.latent_shapes() == [(2, 32, 32), (4, 16, 16), (16, 8, 8)]
    assert sum(c * h * w for c, h, w in cfg.latent_shapes()) == 64 * 64


# ------------------------------------------------------------------------------------------- UNet


def test_unet_shape_and_zero_init():
    torch.manual_seed(0)
    m = DenoisingUNet(UNetConfig.preset("tiny")).eval()
    x, y, t, s = _tiny_unet_inputs(3)
    out = m(x, y, t, s)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # ADM-style zero-initialised last conv


def test_unet_depends_on_t_and_s():
    torch.manual_seed(0)
    m = DenoisingUNet(UNetConfig.preset("tiny")).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.out_conv.weight, std=0.1)
    x, y, t, s = _tiny_unet_inputs(2)
    with torch.no_grad():
        base = m(x, y, t, s)
        dt = m(x, y, t + 37.0, s)
        ds = m(x, y, t, s + 1.5)
    assert (base - dt).abs().max() > 1e-4
    assert (base - ds).abs().max() > 1e-4
    # per-sample: batch entries do not mix
    with torch.no_grad():
        single = m(x[:1], y[:1], t[:1], s[:1])
    torch.testing.assert_close(single, base[:1], rtol=1e-5, atol=1e-5)


def test_unet_backward():
    torch.manual_seed(0)
    m = DenoisingUNet(UNetConfig.preset("tiny"))
    x, y, t, s = _tiny_unet_inputs(2)
    m(x, y, t, s).pow(2).mean().backward()
    assert m.out_conv.weight.grad is not None


# ------------------------------------------------------------------------------------------- flow


def test_squeeze_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    sq = squeeze2d(x)
    assert sq.shape == (2, 12, 4, 4)
    assert torch.equal(unsqueeze2d(sq), x)
    # channel 0..3 of a 1-channel squeeze are the 2x2 block in row-major order
    x1 = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert squeeze2d(x1)[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_flow_pack_unpack_roundtrip():
    f = _tiny_flow()
    eps = torch.randn(2, 1, 8, 8)
    parts = f.unpack_latents(eps)
    assert [tuple(p.shape[1:]) for p in parts] == f.latent_shapes
    assert torch.equal(f.pack_latents(parts), eps)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_flow_reverse_inverts_forward(dtype, tol):
    f = _tiny_flow(dtype)
    x, y = _tiny_flow_inputs(3, dtype)
    with torch.no_grad():
        eps, logdet = f(x, y)
        assert eps.shape == x.shape and logdet.shape == (3,)
        x_rec = f.reverse(eps, y, torch.ones(3, dtype=dtype))
    assert (x_rec - x).abs().max().item() < tol


def test_flow_logdet_matches_bruteforce_jacobian():
    f = _tiny_flow(torch.float64)
    x, y = _tiny_flow_inputs(2, torch.float64)
    with torch.no_grad():
        _, logdet = f(x, y)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: f(v, y[i : i + 1])[0].reshape(-1), x[i : i + 1])
        jac = jac.reshape(x[0].numel(), x[0].numel())
        ref = torch.linalg.slogdet(jac)[1]
        assert abs(ref.item() - logdet[i].item()) < 1e-8


def test_flow_nll_formula_and_tau_zero_is_mean():
    f = _tiny_flow(torch.float64)
    x, y = _tiny_flow_inputs(2, torch.float64)
    with torch.no_grad():
        eps, logdet = f(x, y)
        d = x[0].numel()
        ref = (0.5 * eps.pow(2).sum((1, 2, 3)) + 0.5 * d * np.log(2 * np.pi) - logdet) / d
        torch.testing.assert_close(f.nll(x, y), ref)
        # tau_f = 0: the output does not depend on eps (z = mu_z(y))
        zero = torch.zeros(2, dtype=torch.float64)
        a = f.reverse(torch.randn_like(x), y, zero)
        b = f.reverse(torch.randn_like(x), y, zero)
    torch.testing.assert_close(a, b)


def test_flow_train_mode_matches_eval_buffers_and_guide_has_grads():
    f = _tiny_flow()
    x, y = _tiny_flow_inputs(2)
    with torch.no_grad():
        eps_e, ld_e = f(x, y)
        x_e = f.reverse(eps_e, y, torch.full((2,), 0.7))
    f.train()
    eps_t, ld_t = f(x, y)
    torch.testing.assert_close(eps_t, eps_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld_t, ld_e, rtol=1e-5, atol=1e-4)
    out = f.reverse(eps_e, y, torch.full((2,), 0.7))
    torch.testing.assert_close(out, x_e, rtol=1e-5, atol=1e-5)
    # the guide loss (reverse at tau_f = 0) reaches the 1x1-conv weights in training
    f.zero_grad()
    f.reverse(torch.zeros_like(x), y, torch.zeros(2)).abs().mean().backward()
    inv = next(m for m in f.modules() if isinstance(m, InvConv1x1))
    assert inv.weight.grad is not None and inv.weight.grad.abs().sum() > 0


def test_flow_eval_refreshes_inverse_after_update():
    f = _tiny_flow()
    f.train()
    with torch.no_grad():
        for m in f.modules():
            if isinstance(m, InvConv1x1):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
    f.eval()  # refreshes the buffers
    x, y = _tiny_flow_inputs(2)
    with torch.no_grad():
        eps, _ = f(x, y)
        assert (f.reverse(eps, y, torch.ones(2)) - x).abs().max() < 1e-4


def test_flow_data_init_standardises_first_actnorm():
    f = _tiny_flow()
    x, y = _tiny_flow_inputs(16)
    x = 3.0 * x + 1.0
    f.data_init(x, y)
    first = next(m for m in f.modules() if isinstance(m, ActNorm))
    out, _ = first(x, torch.zeros(16))
    assert abs(out.mean().item()) < 1e-4 and abs(out.std().item() - 1.0) < 0.05


@pytest.mark.parametrize("prior", ["conditional", "learned"])
def test_flow_prior_kinds_and_sample(prior):
    torch.manual_seed(0)
    f = ConditionalFlow(FlowConfig.preset("tiny").replace(prior=prior))
    _perturb(f, 0.1)
    f.eval()
    x, y = _tiny_flow_inputs(2)
    with torch.no_grad():
        eps, _ = f(x, y)
        assert (f.reverse(eps, y, torch.ones(2)) - x).abs().max() < 1e-4
        s = f.sample(y, 0.9, generator=torch.Generator().manual_seed(0))
    assert s.shape == x.shape and torch.isfinite(s).all()


# ------------------------------------------------------------------------------------------- ONNX


def _export(module, args, path, names, out_name):
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=names,
            output_names=[out_name],
            dynamic_shapes=tuple({0: batch} for _ in args),
        )


def _onnx_ops(path):
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    for fn in model.functions:
        ops |= {(n.domain, n.op_type) for n in fn.node}
    return ops


def test_onnx_flow_reverse_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    f = _tiny_flow()
    wrapper = FlowReverse(f).eval()
    eps = torch.randn(2, 1, 8, 8)
    _, y = _tiny_flow_inputs(2)
    tau = torch.tensor([0.9, 0.0])
    # the eval-mode reverse graph holds no inverse/linalg op
    ep = torch.export.export(wrapper, (eps, y, tau))
    targets = " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert "linalg" not in targets and "inverse" not in targets
    path = tmp_path / "flow_reverse.onnx"
    _export(wrapper, (eps, y, tau), path, ["eps", "y", "tau_f"], "x")
    ops = _onnx_ops(path)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    assert not any("Inverse" in op or "Det" in op for _, op in ops)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    eps3 = torch.randn(3, 1, 8, 8)
    _, y3 = _tiny_flow_inputs(3, seed=5)
    tau3 = torch.tensor([1.0, 0.9, 0.0])
    (got,) = sess.run(None, {"eps": eps3.numpy(), "y": y3.numpy(), "tau_f": tau3.numpy()})
    with torch.no_grad():
        ref = f.reverse(eps3, y3, tau3).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_onnx_unet_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = DenoisingUNet(UNetConfig.preset("tiny"))
    _perturb(m, 0.05)
    m.eval()
    path = tmp_path / "unet.onnx"
    _export(m, _tiny_unet_inputs(2), path, ["x_t", "y", "t", "s"], "eps")
    ops = _onnx_ops(path)
    assert ("", "InstanceNormalization") in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y, t, s = _tiny_unet_inputs(3, seed=7)
    (got,) = sess.run(None, {"x_t": x.numpy(), "y": y.numpy(), "t": t.numpy(), "s": s.numpy()})
    with torch.no_grad():
        ref = m(x, y, t, s).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- io


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    unet = DenoisingUNet(UNetConfig.preset("tiny"))
    _perturb(unet)
    unet.eval()
    flow = _tiny_flow()
    meta_u = save_model(unet, unet.config, tmp_path / "unet")
    meta_f = save_model(flow, flow.config, tmp_path / "flow.safetensors")  # suffix is accepted
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["flow.json", "flow.safetensors", "unet.json", "unet.safetensors"]
    for p in tmp_path.iterdir():  # no pickles: safetensors starts with a little-endian header length
        assert p.read_bytes()[:1] != b"\x80"
    meta = json.loads((tmp_path / "unet.json").read_text())
    assert meta == meta_u and meta["kind"] == "unet" and meta["n_params"] == count_parameters(unet)
    assert meta["sha256"] == model_sha256(tmp_path / "unet")
    assert meta_f["kind"] == "flow" and load_config(tmp_path / "flow") == flow.config

    unet2 = load_model(tmp_path / "unet")
    flow2 = load_model(tmp_path / "flow.json")
    assert isinstance(unet2, DenoisingUNet) and isinstance(flow2, ConditionalFlow)
    assert not unet2.training and not flow2.training
    for a, b in ((unet, unet2), (flow, flow2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x, y, t, s = _tiny_unet_inputs(2)
    with torch.no_grad():
        assert torch.equal(unet(x, y, t, s), unet2(x, y, t, s))
        fx, fy = _tiny_flow_inputs(2)
        eps = torch.randn_like(fx)
        assert torch.equal(flow.reverse(eps, fy, torch.ones(2)), flow2.reverse(eps, fy, torch.ones(2)))


def test_load_rejects_tampered_weights(tmp_path):
    flow = _tiny_flow()
    save_model(flow, flow.config, tmp_path / "flow")
    meta = json.loads((tmp_path / "flow.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "flow.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        load_model(tmp_path / "flow")
    with pytest.raises(ValueError):
        save_model(flow, flow.config.replace(levels=1), tmp_path / "bad")
    with pytest.raises(TypeError):
        save_model(flow, UNetConfig.preset("tiny"), tmp_path / "bad")
