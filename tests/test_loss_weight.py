"""The training losses' voxel weight: 1 on the voxels a map is scored on, ``margin_weight`` on the rest of M."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ftddm_trt.constants import MARGIN_WEIGHT
from ftddm_trt.data.examples import SlicePool, collate, make_example
from ftddm_trt.data.phantom import make_subject
from ftddm_trt.diffusion import CosineSchedule, eps_loss, sample_train_timesteps
from ftddm_trt.training.objectives import loss_weight, unet_objective
from ftddm_trt.training.trainer import TrainConfig, resumed_config

T_MAX = 100


@pytest.fixture(scope="module")
def batches():
    """The same four maps under each protocol, unaugmented, at s = 8 and 4."""
    pool = SlicePool.from_subjects([make_subject(0, 0)])
    idx = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) > 200)[:4]
    sizes = [8, 16, 8, 16]
    return {p: collate([make_example(pool, int(i), n, p, None) for i, n in zip(idx, sizes)], sizes)
            for p in ("hr", "lr")}, pool, idx


def test_scored_voxels_are_m_inside_the_truths_quality_mask(batches):
    by_protocol, pool, idx = batches
    truth_mask = torch.from_numpy(pool.masks[idx] > 0.5)[:, None]
    hr, lr = by_protocol["hr"], by_protocol["lr"]
    assert torch.equal(hr.scored, hr.mask)  # hr: M is the quality mask itself
    assert torch.equal(lr.scored.bool(), lr.mask.bool() & truth_mask)
    margin = lr.mask - lr.scored
    assert margin.min() >= 0 and margin.sum() > 0  # lr: M is larger than what is scored


def test_loss_weight_values(batches):
    lr = batches[0]["lr"]
    w = loss_weight(lr, 0.25)
    assert set(torch.unique(w).tolist()) == {0.0, 0.25, 1.0}
    assert torch.equal(w == 1.0, lr.scored.bool())
    assert torch.equal(w == 0.25, (lr.mask - lr.scored).bool())
    assert torch.equal(loss_weight(lr, 1.0), lr.mask)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="margin_weight"):
            loss_weight(lr, bad)


class FixedPrediction(torch.nn.Module):
    """A 'UNet' that returns a given eps prediction whatever its input."""

    def __init__(self, pred: torch.Tensor) -> None:
        super().__init__()
        self.pred = pred

    def forward(self, x_t, y, t, s):
        return self.pred


def _drawn_eps(batch, seed: int) -> torch.Tensor:
    """The eps unet_objective draws from a generator seeded ``seed`` (its timesteps come first)."""
    gen = torch.Generator().manual_seed(seed)
    sample_train_timesteps(batch.x0.shape[0], T_MAX, gen)
    return torch.randn(batch.x0.shape, generator=gen)


@pytest.mark.parametrize("margin_weight", [0.0, 0.1, 1.0])
def test_unet_objective_is_the_weighted_mean_written_out(batches, margin_weight):
    lr = batches[0]["lr"]
    pred = torch.randn(lr.x0.shape, generator=torch.Generator().manual_seed(5))
    loss = unet_objective(FixedPrediction(pred), lr, CosineSchedule(1000), T_MAX, torch.Generator().manual_seed(7),
                          margin_weight=margin_weight)
    sq = ((pred - _drawn_eps(lr, 7)) ** 2).double()
    scored, margin = lr.scored.double(), (lr.mask - lr.scored).double()
    by_hand = ((sq * scored).sum() + margin_weight * (sq * margin).sum()) / (
        scored.sum() + margin_weight * margin.sum()
    )
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    if margin_weight == 1.0:  # the paper's loss over all of M
        assert float(loss) == pytest.approx(float(eps_loss(pred, _drawn_eps(lr, 7), lr.mask)), rel=1e-6)


def test_zero_margin_weight_ignores_the_margin_only(batches):
    lr = batches[0]["lr"]
    pred = torch.zeros(lr.x0.shape)

    def loss(p):
        return float(
            unet_objective(
                FixedPrediction(p), lr, CosineSchedule(1000), T_MAX, torch.Generator().manual_seed(3), margin_weight=0.0
            )
        )

    margin = lr.mask - lr.scored
    assert loss(pred + 5.0 * margin) == loss(pred)
    assert loss(pred + 5.0 * lr.scored) > loss(pred) + 1.0


def test_train_config_checks_the_margin_weight_and_old_runs_resume_with_the_papers_loss(tmp_path: Path):
    with pytest.raises(ValueError, match="--margin-weight"):
        TrainConfig(margin_weight=1.5)
    assert TrainConfig().margin_weight == MARGIN_WEIGHT < 1.0
    old = TrainConfig(preset="tiny")
    saved = {k: v for k, v in old.__dict__.items() if k != "margin_weight"}  # a run saved before the option
    resumed = resumed_config({"config": saved}, TrainConfig(preset="tiny", margin_weight=1.0), tmp_path)
    assert resumed.margin_weight == 1.0
    with pytest.raises(ValueError, match=f"--margin-weight 1.0 -> {MARGIN_WEIGHT}"):  # today's default differs
        resumed_config({"config": saved}, TrainConfig(preset="tiny"), tmp_path)
