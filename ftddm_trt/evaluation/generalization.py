"""Generalization: super-resolution on phantom styles, one of them never seen in training.

For each style (``data.phantom_styles``), a fresh set of subjects is drawn with a seed no training run
uses (``GENERALIZATION_SEED``); a fixed random choice of maps with enough quality-mask voxels is
super-resolved at s = 8, 4, 2 under both mask protocols (``hr``: the paper's 64x64 quality mask; ``lr``:
the N x N qc-derived mask a user has). Every method runs on the same maps with the same seed, and the
zero-filled baseline is scored on them too. Metrics are per map inside the truth's quality mask
(``evaluation.volumes``); the gain is method minus zero-filled, averaged over maps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ftddm_trt.constants import HR_SIZE, T_DIFFUSION
from ftddm_trt.data.examples import SlicePool
from ftddm_trt.data.fine_mask_examples import fine_mask_batch
from ftddm_trt.data.phantom import make_subject
from ftddm_trt.diffusion import CosineSchedule, SampleResult
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import (
    USER_DEFAULT_TAU_F,
    SamplerSpec,
    consistency_for,
    qc_consistency,
    qc_consistency_applies,
    qc_step_weight,
    sample_batch,
    sample_images,
)
from ftddm_trt.evaluation.quality import PROTOCOLS, SCALES, example_tensors
from ftddm_trt.evaluation.volumes import MIN_VOXELS, map_metrics, mask_coverage, summarize
from ftddm_trt.models.fine_mask import FineMaskNet

#: Dataset seed of the generalization subjects (training uses 0 and site folders, never this one).
GENERALIZATION_SEED = 2026


@dataclass(frozen=True)
class Variant:
    """One way of sampling: a label, the sampler, the number of posterior samples averaged, and the
    ``lr``-protocol qc consistency weight (``engine.pipeline.qc_consistency``; as ``upscale``, it acts
    only where data consistency is off; None: upscale's default, ``engine.pipeline.qc_step_weight``).
    ``lr_only``: not run in the ``hr`` protocol (where it would repeat another row)."""

    label: str
    spec: SamplerSpec
    samples: int = 1
    consistency: str = "auto"  # engine.pipeline.consistency_for: auto = on for the hr protocol only
    qc_weight: float | None = 0.0
    lr_only: bool = False


#: What ``upscale`` does with its defaults (first), the paper's temperature, and the default without
#: the qc consistency step (``lr`` only: in ``hr`` it is the default row).
DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("default: FTDDM + DPM-Solver++ 20, tau_f 0", SamplerSpec(tau_f=USER_DEFAULT_TAU_F), qc_weight=None),
    Variant("tau_f 0.9 (paper), 1 sample", SamplerSpec(tau_f=0.9), qc_weight=None),
    Variant("default without qc consistency", SamplerSpec(tau_f=USER_DEFAULT_TAU_F), lr_only=True),
)
#: The posterior mean of K samples (``upscale --samples K --tau-f 0.9``); K times the cost of a variant.
POSTERIOR_MEAN_VARIANT = Variant("tau_f 0.9, mean of 4 samples", SamplerSpec(tau_f=0.9), samples=4,
                                 qc_weight=None)


def style_maps(style: str, n_subjects: int = 6, n_maps: int = 64, seed: int = GENERALIZATION_SEED,
               first_index: int = 0) -> tuple[SlicePool, np.ndarray]:
    """Subjects ``first_index ..`` of ``style`` drawn with ``seed``, and a fixed choice of their maps."""
    subjects = [make_subject(first_index + i, seed, style=style) for i in range(n_subjects)]
    pool = SlicePool.from_subjects(subjects)
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    chosen = np.sort(np.random.default_rng(seed).choice(ok, size=min(n_maps, ok.size), replace=False))
    return pool, chosen


def score_maps(
    backend: Backend,
    pool: SlicePool,
    idx: np.ndarray,
    variants: Sequence[Variant],
    n: int,
    protocol: str,
    batch_size: int = 32,
    seed: int = 0,
    fine_mask_net: FineMaskNet | None = None,
    conventions: Sequence[str] = ("ours",),
) -> list[dict]:
    """Zero-filled, then each variant, on maps ``idx`` of ``pool`` at acquisition ``n`` (one row each).

    In ``lr`` the qc step goes through ``fine_mask_net``'s fine-mask estimate (as ``upscale`` with a model
    that has one), from qc maps written in each of ``conventions`` (``data.qc_conventions``): a row's
    metrics are then the mean over the conventions (M and the sampler's output do not depend on them).

    Variants with the same sampler and samples share their draws (the qc step is applied after); those
    that differ only in solver passes share one run with the most passes (``sample_batch``'s ``on_pass``:
    pass k of it is exactly the ``passes = k`` output). ``seconds_per_map`` is that shared run's time."""
    y, s, scale, truth, region, zf = example_tensors(pool, idx, n, protocol)
    base = {"n": n, "s": HR_SIZE / n, "protocol": protocol, "maps": int(idx.size)}
    zf_m = map_metrics(zf, truth, region)
    rows = [{**base, "method": "zero-filled", **summarize(zf_m)}]
    fines = [qc_fine_masks(pool, idx, n, fine_mask_net, c) if protocol == "lr" else None for c in conventions]
    used = [v for v in variants if not v.lr_only or protocol == "lr"]
    specs = [consistency_for(v.spec, v.consistency, fine_mask=protocol == "hr") for v in used]
    keys = [json.dumps([replace(spec, passes=1).to_dict(), v.samples]) for v, spec in zip(used, specs)]  # draws shared
    most_passes: dict[str, int] = {}
    for key, spec in zip(keys, specs):
        most_passes[key] = max(most_passes.get(key, 1), spec.passes)
    drawn: dict[str, tuple[torch.Tensor, float]] = {}  # key -> ((K, passes, 64, 64) mean over samples, seconds per map)
    coverage = mask_coverage(y[:, 1].numpy() > 0.5, region)
    for v, spec, key in zip(used, specs, keys):
        if key not in drawn:
            t0 = time.perf_counter()
            draws = [every_pass(backend, replace(spec, passes=most_passes[key]), y, s, batch_size, seed + k)
                     for k in range(v.samples)]
            drawn[key] = (torch.stack(draws).mean(0), (time.perf_counter() - t0) / idx.size)
        every, seconds = drawn[key]
        weight = qc_step_weight(v.qc_weight, fine_mask_net)
        per_convention, applied_share = [], []
        for fine in fines:
            xt = every[:, spec.passes - 1 : spec.passes]
            if qc_consistency_applies(spec, fine, weight):
                xt, applied = qc_consistency(xt, y, s, fine, weight)
                applied_share.append(float(applied.float().mean()))
            per_convention.append(
                map_metrics(np.clip(xt[:, 0].numpy() * scale[:, None, None], 0.0, None), truth, region)
            )
        m = {k: np.mean([pc[k] for pc in per_convention], axis=0) for k in per_convention[0]}
        use_qc = bool(applied_share)
        rows.append({**base, "method": v.label, "samples": v.samples, "spec": spec.to_dict(),
                     "qc_consistency": weight if use_qc else 0.0,
                     "qc_applied": float(np.mean(applied_share)) if use_qc else 0.0,
                     "conventions": list(conventions), "coverage": coverage, **summarize(m),
                     "psnr_gain": float(np.nanmean(m["psnr"] - zf_m["psnr"])),
                     "ssim_gain": float(np.nanmean(m["ssim"] - zf_m["ssim"])),
                     "better_than_zero_filled": float(np.mean(m["psnr"] > zf_m["psnr"])),
                     "seconds_per_map": seconds})
    return rows


def every_pass(backend: Backend, spec: SamplerSpec, y: torch.Tensor, s: torch.Tensor, batch_size: int,
               seed: int) -> torch.Tensor:
    """(K, spec.passes, 64, 64): channel k - 1 holds what ``spec`` with ``passes = k`` samples (same seeds)."""
    schedule = CosineSchedule(T_DIFFUSION)

    def batch_sampler(yb: torch.Tensor, sb: torch.Tensor, bseed: int) -> SampleResult:
        outs: list[torch.Tensor] = []
        res = sample_batch(backend, spec, yb, sb, torch.Generator().manual_seed(bseed), schedule, on_pass=outs.append)
        return SampleResult(x0=torch.cat(outs, dim=1), nfe=res.nfe)

    return sample_images(backend, spec, y, s, batch_size=batch_size, seed=seed, batch_sampler=batch_sampler)[0]


def qc_fine_masks(pool: SlicePool, idx: np.ndarray, n: int, fine_mask_net: FineMaskNet | None = None,
                  convention: str = "ours") -> torch.Tensor | None:
    """(K,1,64,64) fine-mask estimates from what an ``n x n`` acquisition of maps ``idx`` gives, its qc
    maps written in ``convention`` (``data.qc_conventions``), as ``upscale`` makes them with
    ``fine_mask_net``; None (no qc step) without an estimator that reads the current features."""
    if fine_mask_net is None or not fine_mask_net.config.current_features:
        return None
    feats, _, _ = fine_mask_batch(pool, idx, [n] * idx.size, None, convention)
    return fine_mask_net.mask(feats)


def run_generalization(
    backend: Backend,
    styles: Sequence[str],
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
    n_subjects: int = 6,
    n_maps: int = 64,
    scales: Sequence[int] = SCALES,
    protocols: Sequence[str] = PROTOCOLS,
    batch_size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = print,
    fine_mask_net: FineMaskNet | None = None,
) -> dict:
    """Zero-filled and every variant on every (style, s, protocol); returns the results record."""
    results: dict = {"seed": GENERALIZATION_SEED, "n_subjects": n_subjects, "n_maps": n_maps,
                     "batch_size": batch_size, "backend": backend.describe(), "runs": []}
    for style in styles:
        pool, idx = style_maps(style, n_subjects, n_maps)
        for n in scales:
            for protocol in protocols:
                rows = [
                    {"style": style, **r}
                    for r in score_maps(backend, pool, idx, variants, n, protocol, batch_size, seed, fine_mask_net)
                ]
                results["runs"] += rows
                for r in rows[1:]:
                    log(f"{style:8s} s={HR_SIZE / n:g} {protocol} {r['method']:36s} PSNR {r['psnr']:.2f} "
                        f"(zero-filled {rows[0]['psnr']:.2f}, gain {r['psnr_gain']:+.2f} dB)")
    return results


def markdown(results: dict, held_out: Sequence[str] = ()) -> str:
    """One table per protocol: PSNR gain over zero-filled (dB) / SSIM, per style and s."""
    runs = results["runs"]
    styles = list(dict.fromkeys(r["style"] for r in runs))
    ns = sorted({r["n"] for r in runs})
    lines = []
    for protocol in dict.fromkeys(r["protocol"] for r in runs):
        lines += [f"### Mask protocol `{protocol}`" + (" (the N x N qc-derived mask a user has)" if protocol == "lr"
                                                      else " (the paper's 64x64 quality mask)"), ""]
        head = ["style", "method"] + [f"s = {HR_SIZE / n:g}: PSNR (gain) / SSIM" for n in ns]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for style in styles:
            tag = f"{style} (held out)" if style in held_out else style
            for method in dict.fromkeys(r["method"] for r in runs if r["style"] == style and r["protocol"] == protocol):
                cells = [tag, method]
                for n in ns:
                    r = next(
                        (
                            r
                            for r in runs
                            if (r["style"], r["n"], r["protocol"], r["method"]) == (style, n, protocol, method)
                        ),
                        None,
                    )
                    if r is None:
                        cells.append("-")
                    elif method == "zero-filled":
                        cells.append(f"{r['psnr']:.2f} / {r['ssim']:.3f}")
                    else:
                        cells.append(f"{r['psnr']:.2f} ({r['psnr_gain']:+.2f}) / {r['ssim']:.3f}")
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path, method: str | None = None) -> None:
    """Bar chart: PSNR gain over zero-filled per style and s, one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["method"] != "zero-filled"]
    method = method or runs[0]["method"]
    styles = list(dict.fromkeys(r["style"] for r in runs))
    ns = sorted({r["n"] for r in runs})
    protocols = list(dict.fromkeys(r["protocol"] for r in runs))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 3.6), squeeze=False)
    width = 0.8 / len(ns)
    for ax, protocol in zip(axes[0], protocols):
        for k, n in enumerate(ns):
            gains = [next((r["psnr_gain"] for r in runs if (r["style"], r["n"], r["protocol"], r["method"]) ==
                           (st, n, protocol, method)), np.nan) for st in styles]
            ax.bar(np.arange(len(styles)) + (k - (len(ns) - 1) / 2) * width, gains, width, label=f"s = {HR_SIZE / n:g}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(styles)), styles)
        ax.set_ylabel("PSNR gain over zero-filled (dB)")
        ax.set_title(f"{method}\nmask protocol {protocol}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(results: dict, out_dir: Path, held_out: Sequence[str] = (), stem: str = "generalization",
                  preamble: str = "") -> dict[str, Path]:
    """JSON + markdown + PNG under ``out_dir`` (no absolute paths inside)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps({**results, "held_out": list(held_out)}, indent=1))
    text = (
        f"# Generalization across phantom styles\n\n{preamble}\n\n"
        if preamble
        else "# Generalization across phantom styles\n\n"
    )
    paths["md"].write_text(text + markdown(results, held_out) + f"\n![PSNR gain]({paths['png'].name})\n")
    plot(results, paths["png"])
    return paths
