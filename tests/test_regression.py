"""The regression yardstick: the UNet asked for the map in one evaluation (``train --task regression``)."""

from __future__ import annotations

import torch

from ftddm_trt.data.examples import Batch
from ftddm_trt.models import DenoisingUNet, UNetConfig
from ftddm_trt.training.objectives import loss_weight, regression_objective, regression_predict


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, 64, 64, generator=g) < 0.6).float()
    scored = mask * (torch.rand(2, 1, 64, 64, generator=g) < 0.7).float()
    y = torch.rand(2, 4, 64, 64, generator=g)
    y[:, 1:2] = mask
    return Batch(x0=torch.rand(2, 1, 64, 64, generator=g) * mask, y=y, mask=mask, s=torch.tensor([2.0, 8.0]),
                 scored=scored)


def test_regression_predicts_inside_m_from_the_zero_filled_map_at_t0():
    torch.manual_seed(0)
    net = DenoisingUNet(UNetConfig.preset("tiny")).eval()
    b = _batch()
    with torch.no_grad():
        got = regression_predict(net, b.y, b.s)
        direct = net(b.y[:, 0:1] * b.mask, b.y, torch.zeros(2), b.s) * b.mask
    assert got.shape == (2, 1, 64, 64)
    assert torch.equal(got, direct)
    assert not got[b.mask == 0].any()


def test_regression_objective_is_the_weighted_mse_brute_force():
    torch.manual_seed(1)
    net = DenoisingUNet(UNetConfig.preset("tiny")).eval()
    b = _batch(1)
    with torch.no_grad():
        loss = float(regression_objective(net, b, margin_weight=0.1))
        pred = regression_predict(net, b.y, b.s)
    w = b.scored + 0.1 * (b.mask - b.scored)
    assert torch.equal(w, loss_weight(b, 0.1))
    brute = float(((pred - b.x0) ** 2 * w).sum() / w.sum())
    assert abs(loss - brute) < 1e-6 * max(1.0, brute)
