"""Robustness: the ``lr`` protocol on acquisitions whose conventions the product did not choose.

Axes: the metabolite-map family (``tissue``: the tissue-fraction generator in all four styles, ribbon
included; ``fields``: random fields and textures, ``data.field_phantom``, never used to train or tune the
shipped model), the qc convention of the N x N qc maps (``data.qc_conventions``: every one, thresholds
of the site's own quality mask and missing qc maps included) and s = 8, 4, 2. Subjects come from a seed
no training run or earlier choice used (``ROBUSTNESS_SEED``).

Each cell scores, inside the truth's quality mask (the site's thresholds), against zero-filled:
the default (``upscale``'s: FTDDM + DPM-Solver++ 20, qc step through the fine-mask estimator, kept per map
only where it agrees better with the acquired band), the default without the qc step, the qc step without
that check, two solver passes (checked), and, when given, a regression UNet and a fine-tuned model of
the cell's family. M comes from the acquired maps alone (``data.masks.lr_support_mask``), so the sampler
runs once per (family, s) and only the qc step differs between conventions; the ``strict-thresholds``
convention changes the truth itself and runs apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ftddm_trt.constants import HR_SIZE, USER_DEFAULT_TAU_F
from ftddm_trt.data.examples import SlicePool
from ftddm_trt.data.field_phantom import make_field_subject
from ftddm_trt.data.phantom import PhantomSubject, make_subject
from ftddm_trt.data.qc_conventions import BENCHMARK_CONVENTIONS, get_convention, with_site_thresholds
from ftddm_trt.diffusion.consistency import partial_consistency
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for, qc_consistency, qc_step_weight
from ftddm_trt.evaluation.generalization import every_pass, qc_fine_masks
from ftddm_trt.evaluation.quality import example_tensors
from ftddm_trt.evaluation.volumes import MIN_VOXELS, map_metrics, mask_coverage, summarize
from ftddm_trt.models.fine_mask import FineMaskNet

__all__ = ["ROBUSTNESS_SEED", "FAMILIES", "TISSUE_STYLES", "System", "family_subjects", "family_maps",
           "score_cell", "summarize_cells"]

#: Dataset seed of the robustness subjects (no training run and no earlier choice used it).
ROBUSTNESS_SEED = 3032
FAMILIES: tuple[str, ...] = ("tissue", "fields")
TISSUE_STYLES: tuple[str, ...] = ("classic", "ribbon", "smooth", "patchy")
SCALES_N: tuple[int, ...] = (8, 16, 32)


@dataclass(frozen=True)
class System:
    """A model to score: a label, its backend, its fine-mask estimator (None: no qc step) and the sampler its
    default runs (None: the solver sampler, flow + 20 DPM-Solver++ steps from the flow's mode)."""

    label: str
    backend: Backend
    fine_mask_net: FineMaskNet | None
    spec: SamplerSpec | None = None


def family_subjects(family: str, n_subjects: int, seed: int = ROBUSTNESS_SEED, first: int = 0) -> list[PhantomSubject]:
    """Subjects ``first ..`` of ``family`` (``tissue``: the four styles in turn; ``fields``)."""
    if family == "fields":
        return [make_field_subject(first + i, seed) for i in range(n_subjects)]
    if family == "tissue":
        return [make_subject(first + i, seed, style=TISSUE_STYLES[i % len(TISSUE_STYLES)]) for i in range(n_subjects)]
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def family_maps(subjects: list[PhantomSubject], n_maps: int, convention: str = "ours", seed: int = ROBUSTNESS_SEED
                ) -> tuple[SlicePool, np.ndarray]:
    """The slice pool of ``subjects`` under the site thresholds of ``convention`` and a fixed choice of maps
    with enough quality-mask voxels to score."""
    conv = get_convention(convention)
    pool = SlicePool.from_subjects([with_site_thresholds(subj, conv) for subj in subjects])
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    return pool, np.sort(np.random.default_rng(seed).choice(ok, size=min(n_maps, ok.size), replace=False))


def _gain_row(base: dict, label: str, x: torch.Tensor, scale: np.ndarray, truth: np.ndarray, region: np.ndarray,
              zf_m: dict, **extra) -> dict:
    m = map_metrics(np.clip(x[:, 0].numpy() * scale[:, None, None], 0.0, None), truth, region)
    return {**base, "method": label, **extra, **summarize(m),
            "psnr_gain": float(np.nanmean(m["psnr"] - zf_m["psnr"])),
            "ssim_gain": float(np.nanmean(m["ssim"] - zf_m["ssim"])),
            "worse_than_zero_filled": float(np.nanmean(m["psnr"] < zf_m["psnr"]))}


def score_cell(
    systems: Sequence[System],
    pool: SlicePool,
    idx: np.ndarray,
    n: int,
    conventions: Sequence[str],
    regression: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Rows for maps ``idx`` of ``pool`` acquired at ``n``, for each qc convention in ``conventions``.

    The first system (its sampler the solver's) gets every row (default, without the qc step, the qc step
    unchecked, two passes);
    the others their default only. ``regression(y, s) -> x0`` adds a regression row (convention-free).
    """
    y, s, scale, truth, region, zf = example_tensors(pool, idx, n, "lr")
    zf_m = map_metrics(zf, truth, region)
    base = {"n": n, "s": HR_SIZE / n, "maps": int(idx.size), "coverage": mask_coverage(y[:, 1].numpy() > 0.5, region)}
    solver = SamplerSpec(tau_f=USER_DEFAULT_TAU_F)
    outputs = []
    for k, system in enumerate(systems):
        spec = consistency_for(system.spec or solver, "auto", fine_mask=False)
        t0 = time.perf_counter()
        if k == 0:  # the first system also gets the two-pass row
            spec = replace(spec, passes=2)
        every = every_pass(system.backend, spec, y, s, batch_size, seed)
        outputs.append((every, (time.perf_counter() - t0) / idx.size))
    reg = None
    if regression is not None:
        with torch.no_grad():
            reg = torch.cat(
                [regression(y[i : i + batch_size], s[i : i + batch_size]) for i in range(0, len(y), batch_size)]
            )
    rows = []
    for convention in conventions:
        cbase = {**base, "convention": convention}
        rows.append({**cbase, "method": "zero-filled", **summarize(zf_m), "psnr_gain": 0.0, "ssim_gain": 0.0,
                     "worse_than_zero_filled": 0.0})
        for k, (system, (every, seconds)) in enumerate(zip(systems, outputs)):
            fine = qc_fine_masks(pool, idx, n, system.fine_mask_net, convention)
            weight = qc_step_weight(None, system.fine_mask_net)
            x1 = every[:, :1]
            if fine is not None and weight > 0:
                x_def, applied = qc_consistency(x1, y, s, fine, weight)
                kept = float(applied.float().mean())
            else:
                x_def, kept = x1, 0.0
            rows.append(_gain_row(cbase, f"{system.label}: default", x_def, scale, truth, region, zf_m,
                                  qc_kept=kept, seconds_per_map=seconds))
            if k > 0:
                continue
            rows.append(_gain_row(cbase, f"{system.label}: without the qc step", x1, scale, truth, region, zf_m))
            if fine is not None and weight > 0:
                unchecked = partial_consistency(x1, y[:, 0:1], fine, s, weight) * y[:, 1:2]
                rows.append(_gain_row(cbase, f"{system.label}: qc step without the do-no-harm check", unchecked, scale,
                                      truth, region, zf_m))
                x2, applied2 = qc_consistency(every[:, 1:2], y, s, fine, weight)
            else:
                x2, applied2 = every[:, 1:2], torch.zeros(0)
            rows.append(_gain_row(cbase, f"{system.label}: 2 solver passes (checked)", x2, scale, truth, region, zf_m,
                                  qc_kept=float(applied2.float().mean()) if applied2.numel() else 0.0))
        if reg is not None:
            rows.append(_gain_row(cbase, "regression UNet (trained on the family)", reg, scale, truth, region, zf_m))
    return rows


def summarize_cells(rows: Sequence[dict], method: str) -> dict:
    """Floor (smallest mean gain over cells), median, and the same at s = 4, of ``method``'s PSNR gain."""
    gains = [r["psnr_gain"] for r in rows if r["method"] == method]
    at4 = [r["psnr_gain"] for r in rows if r["method"] == method and r["n"] == 16]
    cov = [r["coverage"] for r in rows if r["method"] == method]
    if not gains:
        return {}
    return {"cells": len(gains), "floor": float(np.min(gains)), "median": float(np.median(gains)),
            "floor_s4": float(np.min(at4)) if at4 else None, "median_s4": float(np.median(at4)) if at4 else None,
            "min_coverage": float(np.min(cov))}


#: Every convention of the benchmark axis, in table order.
CONVENTION_AXIS: tuple[str, ...] = BENCHMARK_CONVENTIONS
