"""What a learned fine mask buys the ``lr`` qc consistency step (``benchmarks/fine_mask.py``).

The default sampler runs once per map and acquisition size (``lr`` protocol, no qc step); the step is
then applied to those same outputs through each mask: none, the qc estimate F at the shipped weight,
the learned estimator at each (threshold, weight) of a grid, and the truth's quality mask (an oracle,
not available to a user). Scores are PSNR / SSIM gains over zero-filled inside the truth's mask, as in
``evaluation.generalization``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ftddm_trt.constants import USER_DEFAULT_TAU_F
from ftddm_trt.data.examples import SlicePool
from ftddm_trt.data.fine_mask_examples import dice, fine_mask_batch
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, qc_consistency, sample_images
from ftddm_trt.evaluation.quality import example_tensors
from ftddm_trt.evaluation.volumes import map_metrics, summarize
from ftddm_trt.models.fine_mask import FineMaskNet

THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
WEIGHTS: tuple[float, ...] = (0.2, 0.5, 1.0)


def learned_masks(net: FineMaskNet, pool: SlicePool, idx: np.ndarray, n: int, thresholds: Sequence[float],
                  convention: str = "ours") -> dict[float, torch.Tensor]:
    """(K,1,64,64) thresholded estimates of maps ``idx`` acquired at ``n`` (qc in ``convention``), one per threshold."""
    feats, _, support = fine_mask_batch(pool, idx, [n] * idx.size, None, convention)
    with torch.no_grad():
        prob = torch.sigmoid(net(feats)) * support
    return {t: (prob > t).float() for t in thresholds}


def score_steps(backend: Backend, net: FineMaskNet, pool: SlicePool, idx: np.ndarray, n: int,
                thresholds: Sequence[float] = THRESHOLDS, weights: Sequence[float] = WEIGHTS,
                batch_size: int = 32, seed: int = 0, conventions: Sequence[str] = ("ours",)) -> list[dict]:
    """One row per (qc convention, mask, weight) on maps ``idx`` at acquisition ``n``: PSNR / SSIM gain, Dice
    of the mask. The sampler runs once; each step is applied after, as ``upscale`` applies it (kept per map
    only where it agrees better with the acquired band)."""
    y, s, scale, truth, region, zf = example_tensors(pool, idx, n, "lr")
    spec = replace(SamplerSpec(tau_f=USER_DEFAULT_TAU_F), data_consistency=False)
    x, _ = sample_images(backend, spec, y, s, batch_size=batch_size, seed=seed)
    zf_m = map_metrics(zf, truth, region)
    true_mask = torch.from_numpy(region[:, None].astype(np.float32))
    rows = []
    for convention in conventions:
        candidates: list[tuple[str, float | None, torch.Tensor | None, float]] = [("none", None, None, 0.0)]
        for t, m in learned_masks(net, pool, idx, n, thresholds, convention).items():
            candidates += [("learned", t, m, w) for w in weights]
        candidates += [("true mask (oracle)", None, true_mask, w) for w in weights]
        for name, thr, mask, w in candidates:
            xt = qc_consistency(x, y, s, mask, w)[0] if mask is not None and w > 0 else x
            met = map_metrics(np.clip(xt[:, 0].numpy() * scale[:, None, None], 0.0, None), truth, region)
            rows.append({"n": n, "s": 64 / n, "maps": int(idx.size), "convention": convention, "mask": name,
                         "threshold": thr, "weight": w,
                         "dice": None if mask is None else dice(mask[:, 0].numpy() > 0.5, region > 0.5),
                         **summarize(met), "psnr_gain": float(np.nanmean(met["psnr"] - zf_m["psnr"])),
                         "ssim_gain": float(np.nanmean(met["ssim"] - zf_m["ssim"]))})
    return rows


def choose_step(rows: Sequence[dict]) -> tuple[float, float]:
    """The learned (threshold, weight) whose worst mean PSNR gain over the rows' groups (each style and
    acquisition size; rows without a style group by size alone) is highest; the overall mean breaks ties.
    The worst case rather than the mean: a weight that gains most where the estimator is good loses most
    where it is not (docs/architecture.md, "Data consistency")."""
    groups: dict[tuple[float, float], dict[tuple, list[float]]] = {}
    for r in rows:
        if r["mask"] == "learned":
            group = (r.get("style"), r.get("convention"), r["n"])
            groups.setdefault((r["threshold"], r["weight"]), {}).setdefault(group, []).append(r["psnr_gain"])
    if not groups:
        raise ValueError("no learned-mask rows to choose from")

    def score(key: tuple[float, float]) -> tuple[float, float]:
        means = [float(np.mean(g)) for g in groups[key].values()]
        return min(means), float(np.mean(means))

    return max(groups, key=score)
