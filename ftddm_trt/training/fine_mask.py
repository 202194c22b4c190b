"""Train the fine-mask estimator (``models.fine_mask``) on the ``lr`` examples of a slice pool.

Each example is one augmented map (``data.examples``' rotation, flip and shift) acquired at an N drawn
from ``TRAINED_LR_SIZES``: the estimator sees what an ``lr`` user has (``data.masks.fine_mask_features``) and
learns the truth's 64x64 quality mask by binary cross-entropy inside M (outside M every output is
zero anyway).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ftddm_trt.atomic import atomic_dir, check_output
from ftddm_trt.constants import TRAINED_LR_SIZES
from ftddm_trt.data.examples import SlicePool
from ftddm_trt.data.fine_mask_examples import (
    TRAINING_CONVENTIONS,
    FineMaskExample,
    dice,
    fine_mask_batch,
    fine_mask_example,
)
from ftddm_trt.engine.torch_backend import TorchBackend
from ftddm_trt.evaluation.fine_mask import choose_step, score_steps
from ftddm_trt.evaluation.volumes import MIN_VOXELS
from ftddm_trt.models.fine_mask import FineMaskConfig, FineMaskNet
from ftddm_trt.models.io import model_sha256, save_model
from ftddm_trt.models.model_set import FINE_MASK_FILE, ModelSet

__all__ = ["TRAINING_CONVENTIONS", "FineMaskExample", "fine_mask_example", "fine_mask_batch", "masked_bce", "dice",
           "train_fine_mask", "validation_maps", "tune_step", "step_summary", "add_fine_mask"]


def masked_bce(logits: torch.Tensor, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the pixels of M (``support``); all (B, 1, H, W)."""
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per * support).sum() / support.sum().clamp_min(1.0)


def train_fine_mask(
    pool: SlicePool,
    config: FineMaskConfig,
    minutes: float | None = None,
    iterations: int | None = None,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    init: FineMaskNet | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[FineMaskNet, dict]:
    """Train (or continue ``init``) until ``minutes`` or ``iterations``, whichever comes first.

    Maps with fewer than 40 quality-mask pixels are skipped. Returns the network (eval mode) and a
    summary: iterations, seconds, the mean loss of the last 50 iterations.
    """
    if minutes is None and iterations is None:
        raise ValueError("give minutes or iterations (or both)")
    usable = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 40)
    if usable.size == 0:
        raise ValueError("no map has a quality mask of 40 pixels or more")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = init if init is not None else FineMaskNet(config)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start, it, losses = time.monotonic(), 0, []
    while (iterations is None or it < iterations) and (minutes is None or time.monotonic() - start < 60 * minutes):
        idx = rng.choice(usable, size=batch_size)
        sizes = [int(rng.choice(TRAINED_LR_SIZES)) for _ in range(batch_size)]
        feats, target, support = fine_mask_batch(pool, idx, sizes, rng)
        loss = masked_bce(net(feats), target, support)
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
        losses.append(float(loss.detach()))
        if log is not None and it % 100 == 0:
            log(f"fine mask: iteration {it}, loss {np.mean(losses[-100:]):.4f}, {time.monotonic() - start:.0f} s")
    net.eval()
    return net, {"iterations": it, "seconds": round(time.monotonic() - start, 1),
                 "final_loss": float(np.mean(losses[-50:])) if losses else None}


def validation_maps(pool: SlicePool, n_maps: int = 32, seed: int = 0) -> np.ndarray:
    """A fixed choice of up to ``n_maps`` maps of ``pool`` with enough quality-mask voxels to score."""
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    return np.sort(np.random.default_rng(seed).choice(ok, size=min(n_maps, ok.size), replace=False))


def tune_step(net: FineMaskNet, backend, pool: SlicePool, idx: np.ndarray, sizes: tuple[int, ...] = (8, 16, 32),
              batch_size: int = 32) -> tuple[FineMaskConfig, list[dict]]:
    """Threshold and weight of the qc step with ``net``, chosen on maps ``idx`` of ``pool`` (the model on
    ``backend``'s default sampler, ``lr`` protocol, each of ``sizes``, qc maps in every convention the
    estimator trains over; ``evaluation.fine_mask``): the best worst-case PSNR gain, or weight 0 (no step) when
    no learned setting beats none on average. Returns (config, score rows)."""
    conventions = [c.name for c in TRAINING_CONVENTIONS]
    rows = [r for n in sizes for r in score_steps(backend, net, pool, idx, n, batch_size=batch_size,
                                                  conventions=conventions)]
    thr, w = choose_step(rows)
    best = np.mean(
        [r["psnr_gain"] for r in rows if r["mask"] == "learned" and (r["threshold"], r["weight"]) == (thr, w)]
    )
    none = np.mean([r["psnr_gain"] for r in rows if r["mask"] == "none"])
    return net.config.replace(threshold=thr, consistency_weight=w if best > none else 0.0), rows


def step_summary(rows: list[dict]) -> list[dict]:
    """The score rows of ``tune_step`` reduced to what a manifest records."""
    keep = ("n", "mask", "threshold", "weight", "dice", "psnr", "psnr_gain")
    return [{k: r[k] for k in keep} for r in rows]


def add_fine_mask(model_dir: Path | None, out_dir: Path, train_subjects: list, val_subjects: list, minutes: float,
                  command: str, data: dict, force: bool = False, seed: int = 0,
                  log: Callable[[str], None] | None = print) -> dict:
    """Train a fine-mask estimator for the model in ``model_dir`` (default: the shipped model) and write
    ``out_dir``: the model's files and ``fine_mask.*``, with the estimator's threshold and weight chosen
    on ``val_subjects`` with the model's own networks; the manifest records how (``data``: where the
    subjects came from) and ``command``. ``out_dir`` is written atomically (``atomic.atomic_dir``).
    Returns the written manifest."""
    models = ModelSet.open(model_dir)
    check_output(Path(out_dir), force, inputs=(models.root,))  # before the training, not after
    net, summary = train_fine_mask(
        SlicePool.from_subjects(train_subjects), FineMaskConfig.preset("cpu"), minutes=minutes, seed=seed, log=log
    )
    val_pool = SlicePool.from_subjects(val_subjects)
    net.config, rows = tune_step(net, TorchBackend(models), val_pool, validation_maps(val_pool))
    if log is not None:
        log(f"fine mask: threshold {net.config.threshold:g}, qc weight {net.config.consistency_weight:g} "
            f"(chosen on {len(val_subjects)} validation subjects)")
    with atomic_dir(Path(out_dir), force=force, inputs=(models.root,), command="add-fine-mask") as tmp:
        for src in sorted(models.root.iterdir()):
            if src.is_file() and src.stem != FINE_MASK_FILE and src.name != "manifest.json":
                shutil.copyfile(src, tmp / src.name)
        save_model(net, net.config, tmp / FINE_MASK_FILE)
        manifest = models.manifest()
        manifest.setdefault("networks", {})[FINE_MASK_FILE] = {
            "sha256": model_sha256(tmp / FINE_MASK_FILE),
            "training": {**summary, "minutes": minutes, "seed": seed, **data},
            "threshold": net.config.threshold,
            "consistency_weight": net.config.consistency_weight,
            "validation": step_summary(rows),
        }
        manifest["commands"] = [*manifest.get("commands", []), command]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
