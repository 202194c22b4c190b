"""Quality of super-resolved volumes against the truth: NRMSE / PSNR / SSIM / sharpness per metabolite and overall.

Every metric is computed per 2D map inside the truth's quality mask (the paper's region) and
averaged over the maps that have at least ``MIN_VOXELS`` voxels in the mask. ``coverage`` is the
fraction of the truth's mask voxels where the prediction is non-zero (a prediction cut by a coarse
mask leaves some of them empty). Sharpness is ``data.metrics.sharpness`` (the mean gradient magnitude
relative to the truth's: 1 = as sharp as the truth, < 1 blurrier, > 1 noisier).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from ftddm_trt.data.metrics import nrmse, psnr, sharpness, ssim

MIN_VOXELS = 10
METRICS: tuple[str, ...] = ("nrmse", "psnr", "ssim", "sharpness")


def map_metrics(pred: NDArray, truth: NDArray, region: NDArray) -> dict[str, NDArray[np.float64]]:
    """Per-map metrics for ``(..., 64, 64)`` stacks; maps with too few region voxels give NaN."""
    region = region.astype(bool)
    valid = region.sum(axis=(-2, -1)) >= MIN_VOXELS
    out = {"nrmse": nrmse(pred, truth, region), "psnr": psnr(pred, truth, region), "ssim": ssim(pred, truth, region),
           "sharpness": sharpness(pred, truth, region)}
    return {k: np.where(valid, np.asarray(v, dtype=np.float64), np.nan) for k, v in out.items()}


def mask_coverage(mask: NDArray, region: NDArray) -> float:
    """Share of the ``region`` voxels (the truth's quality mask, ``(..., 64, 64)``) inside ``mask`` (the mask M
    the output is cut by); 1 when the region is empty."""
    region = np.asarray(region, bool)
    return float((np.asarray(mask, bool) & region).sum() / max(int(region.sum()), 1)) if region.any() else 1.0


def summarize(values: dict[str, NDArray]) -> dict[str, float]:
    """Mean of each metric over the valid maps, and how many maps that was.

    Invalid maps are NaN; a perfect map has PSNR = +inf and is valid (its NRMSE is 0, its SSIM 1). A metric
    that is NaN on some valid maps (sharpness against a flat truth) is averaged over the others, NaN if none.
    """
    valid = ~np.isnan(values["psnr"])
    out = {}
    for k, v in values.items():
        v = np.asarray(v, dtype=np.float64)[valid]
        out[k] = float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan")
    out["n_maps"] = int(valid.sum())
    return out


def evaluate_volume(
    pred: NDArray,
    truth: NDArray,
    truth_mask: NDArray,
    metabolites: Sequence[str],
    baselines: dict[str, NDArray] | None = None,
) -> dict:
    """Metrics of ``pred`` (and of each baseline, e.g. zero-filled) per metabolite and overall.

    All arrays are ``(Z, M, 64, 64)`` with metabolites along axis 1, in ``metabolites`` order.
    """
    methods = {"prediction": pred, **(baselines or {})}
    result: dict = {"metabolites": {}, "overall": {}}
    for name, arr in methods.items():
        per = map_metrics(arr, truth, truth_mask)
        result["overall"][name] = summarize(per)
        for c, metab in enumerate(metabolites):
            result["metabolites"].setdefault(metab, {})[name] = summarize({k: v[:, c] for k, v in per.items()})
    region = truth_mask.astype(bool)
    covered = (pred != 0) & region
    result["overall"]["prediction"]["coverage"] = float(covered.sum() / max(region.sum(), 1))
    for c, metab in enumerate(metabolites):
        result["metabolites"][metab]["prediction"]["coverage"] = float(covered[:, c].sum() / max(region[:, c].sum(), 1))
    return result


def markdown_table(result: dict) -> str:
    """A readable table: one row per metabolite (and overall), PSNR / SSIM / NRMSE per method."""
    methods = list(result["overall"])
    head = "| metabolite | " + " | ".join(f"{m} PSNR | {m} SSIM | {m} NRMSE" for m in methods) + " | coverage |"
    sep = "|---" * (2 + 3 * len(methods)) + "|"
    rows = [head, sep]
    for label, block in [*result["metabolites"].items(), ("overall", result["overall"])]:
        cells = []
        for m in methods:
            r = block[m]
            cells += [f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['nrmse']:.3f}"]
        rows.append(
            f"| {label} | " + " | ".join(cells) + f" | {block['prediction'].get('coverage', float('nan')):.3f} |"
        )
    return "\n".join(rows)
