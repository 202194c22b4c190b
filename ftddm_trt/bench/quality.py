"""Quality versus NFE on the phantom test split (the shape of the paper's Table 1 and Fig. 5).

For each upscaling factor s in (8, 4, 2) and each mask protocol (``hr``: the paper's 64x64 quality
mask; ``lr``: the mask a user has, from N x N qc maps), the same maps of the test split are
super-resolved by every method on one backend in one run. Metrics (NRMSE / PSNR / SSIM) are computed
per map inside the truth's quality mask, in file units. Seconds per map are wall time of the whole
batched loop divided by the number of maps, and the speed-up over DDPM-1000 is the ratio of those
measured times. DDPM-1000 costs ~10x the others, so it runs on the first ``ddpm_maps`` maps only;
every other method also reports its metrics on that subset so the comparison stays like with like.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ftddm_trt.constants import HR_SIZE
from ftddm_trt.data.evaluation import MIN_VOXELS, map_metrics, summarize
from ftddm_trt.data.examples import SlicePool, pool_stack, prepare_example
from ftddm_trt.data.phantom import fold_split, generate_dataset
from ftddm_trt.engine.backend import Backend
from ftddm_trt.diffusion import DEFAULT_LAMBDA_MIN
from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for, sample_images

SCALES: tuple[int, ...] = (8, 16, 32)  # N for s = 8, 4, 2
PROTOCOLS: tuple[str, ...] = ("hr", "lr")


@dataclass(frozen=True)
class Method:
    label: str
    spec: SamplerSpec
    family: str


def paper_methods(include_ddpm: bool = True, ftddm_ttruncs: tuple[int, ...] = (100,),
                  clip_x0: tuple[float, float] | None = (0.0, 3.0), lambda_min: float | None = DEFAULT_LAMBDA_MIN,
                  solver_variants: bool = True) -> list[Method]:
    """The rows of the paper's Table 1 / Table 4; FTDDM at each Ttrunc a flow was trained for.

    ``clip_x0`` and ``lambda_min`` are every row's settings (SamplerSpec); ``solver_variants`` adds
    DPM-Solver++ 100 from noise with the other choice of each (the baselines with and without the clips).
    """
    def spec(name: str, **kw) -> SamplerSpec:
        return SamplerSpec(name, **{"clip_x0": clip_x0, "lambda_min": lambda_min, **kw})

    rows = []
    if include_ddpm:
        rows.append(Method("DDPM T=1000", spec("ddpm"), "DDPM"))
    rows += [Method(f"DDPM respaced {k}", spec("ddpm-respaced", steps=k), "DDPM respaced") for k in (100, 50, 20)]
    rows += [Method(f"DPM-Solver++ {k}", spec("dpmpp", steps=k), "DPM-Solver++") for k in (100, 20, 10)]
    if solver_variants:
        other_clip = None if clip_x0 is not None else (0.0, 3.0)
        other_lambda = None if lambda_min is not None else DEFAULT_LAMBDA_MIN
        rows.append(Method(f"DPM-Solver++ 100, clip_x0={_fmt_opt(other_clip)}", spec("dpmpp", steps=100, clip_x0=other_clip),
                           "DPM-Solver++ variant"))
        rows.append(Method(f"DPM-Solver++ 100, lambda_min={_fmt_opt(other_lambda)}",
                           spec("dpmpp", steps=100, lambda_min=other_lambda), "DPM-Solver++ variant"))
    rows += [Method(f"FTDDM Ttrunc={t}", spec("ftddm", ttrunc=t), "FTDDM") for t in ftddm_ttruncs]
    rows += [Method(f"FTDDM + DPM-Solver++ {k}", spec("ftddm-dpmpp", ttrunc=100, steps=k), "FTDDM + DPM-Solver++")
             for k in (50, 20, 10)]
    rows.append(Method("flow only (tau_f=0)", spec("flow", tau_f=0.0), "flow"))
    return rows


def _fmt_opt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(f"{x:g}" for x in v)
    return f"{v:g}"


def test_maps(n_maps: int, seed: int = 0, data_seed: int = 0, fold: int = 0) -> tuple[SlicePool, np.ndarray, list[str]]:
    """A fixed random choice of test-split maps that have at least MIN_VOXELS mask voxels."""
    subjects = generate_dataset(25, seed=data_seed)
    _, _, test_ids = fold_split(25, fold=fold)
    pool = SlicePool.from_subjects([s for s in subjects if s.subject_id in test_ids])
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(ok, size=min(n_maps, ok.size), replace=False))
    return pool, chosen, test_ids


def example_tensors(pool: SlicePool, idx: np.ndarray, n: int, protocol: str):
    """Network inputs and references of maps ``idx`` at acquisition ``n``: (y, s, scale, truth, region, zero_filled)."""
    exs = [prepare_example(pool_stack(pool, int(i)), n, protocol) for i in idx]
    y = torch.from_numpy(np.stack([e.y for e in exs]))
    s = torch.full((len(exs),), HR_SIZE / n)
    scale = np.array([e.scale for e in exs], np.float32)
    truth = np.stack([e.truth for e in exs])
    region = np.stack([e.truth_mask for e in exs])
    zero_filled = np.stack([e.zero_filled for e in exs])
    return y, s, scale, truth, region, zero_filled


def run_quality(
    backend: Backend,
    methods: list[Method],
    n_maps: int = 64,
    ddpm_maps: int = 8,
    batch_size: int = 32,
    scales: tuple[int, ...] = SCALES,
    protocols: tuple[str, ...] = PROTOCOLS,
    seed: int = 0,
    log: Callable[[str], None] = print,
    flow_backends: dict[int, Backend] | None = None,
) -> dict:
    """Run every method on every (scale, protocol); returns the full results record.

    ``flow_backends`` maps a Ttrunc to a backend whose flow was trained for it (same UNets); flow-based
    methods at that Ttrunc run there, everything else on ``backend``.
    """
    flow_backends = flow_backends or {}
    pool, idx, test_ids = test_maps(n_maps, seed=seed)
    results: dict = {"test_subjects": test_ids, "n_maps": int(idx.size), "ddpm_maps": min(ddpm_maps, idx.size),
                     "map_indices": idx.tolist(), "batch_size": batch_size, "backend": backend.describe(), "runs": []}
    for n in scales:
        for protocol in protocols:
            y, s, scale, truth, region, zf = example_tensors(pool, idx, n, protocol)
            zf_metrics = map_metrics(zf, truth, region)
            base = {"n": n, "s": HR_SIZE / n, "protocol": protocol}
            results["runs"].append({**base, "method": "zero-filled", "nfe": 0, "seconds_per_map": 0.0,
                                    "all": summarize(zf_metrics),
                                    "subset": summarize({k: v[:ddpm_maps] for k, v in zf_metrics.items()})})
            for m in methods:
                k = ddpm_maps if m.spec.name == "ddpm" else idx.size
                t0 = time.perf_counter()
                runner = flow_backends.get(m.spec.ttrunc, backend) if m.spec.uses_flow else backend
                spec = consistency_for(m.spec, "auto", fine_mask=protocol == "hr")  # what upscale does by default
                x, nfe = sample_images(runner, spec, y[:k], s[:k], batch_size=batch_size, seed=seed)
                seconds = time.perf_counter() - t0
                pred = np.clip(x[:, 0].numpy() * scale[:k, None, None], 0.0, None)
                met = map_metrics(pred, truth[:k], region[:k])
                row = {**base, "method": m.label, "family": m.family, "spec": spec.to_dict(), "nfe": nfe,
                       "maps": k, "seconds_per_map": seconds / k,
                       "subset": summarize({kk: v[:ddpm_maps] for kk, v in met.items()})}
                if k == idx.size:
                    row["all"] = summarize(met)
                results["runs"].append(row)
                log(f"N={n:2d} {protocol} {m.label:28s} NFE {nfe:4d}  {seconds / k:7.3f} s/map  "
                    f"PSNR {row['subset']['psnr']:.2f} (subset)" + (f" {row['all']['psnr']:.2f} (all)" if "all" in row else ""))
    return results


def _speedups(results: dict) -> dict[str, float]:
    """Measured seconds-per-map of DDPM-1000 over each method's, averaged over all (scale, protocol)."""
    per: dict[str, list[float]] = {}
    for n in {r["n"] for r in results["runs"]}:
        for p in {r["protocol"] for r in results["runs"]}:
            rows = {r["method"]: r for r in results["runs"] if r["n"] == n and r["protocol"] == p}
            ref = rows.get("DDPM T=1000")
            if ref is None:
                continue
            for name, r in rows.items():
                if r["seconds_per_map"] > 0:
                    per.setdefault(name, []).append(ref["seconds_per_map"] / r["seconds_per_map"])
    return {k: float(np.median(v)) for k, v in per.items()}


def markdown(results: dict, params: dict[str, int]) -> str:
    """Paper-style tables (one per protocol) with metrics on all maps and on the DDPM subset."""
    speed = _speedups(results)
    lines = [f"Test split subjects {', '.join(results['test_subjects'])}; {results['n_maps']} maps per (s, protocol), "
             f"the same maps for every method; DDPM T=1000 on the first {results['ddpm_maps']} of them only, so the "
             f"`subset` columns compare every method on those {results['ddpm_maps']} maps. Backend: "
             f"{results['backend'].get('backend')}, batch {results['batch_size']}. Seconds per map are wall time of the "
             "batched loop / maps; speed-up = DDPM-1000's measured s/map / the method's (median over s and protocol).", ""]
    for protocol in sorted({r["protocol"] for r in results["runs"]}):
        rows = [r for r in results["runs"] if r["protocol"] == protocol]
        ns = sorted({r["n"] for r in rows})
        lines.append(f"### Mask protocol `{protocol}`" + (" (paper: 64x64 quality mask)" if protocol == "hr" else
                                                          " (user: mask from N x N qc maps, dilated)"))
        lines.append("")
        head = ["method", "NFE", "s/map (s=4)", "speed-up", "params"]
        for part in ("all", "subset"):
            for metric in ("PSNR", "SSIM", "NRMSE"):
                head.append(f"{metric} {part} s=" + "/".join(f"{HR_SIZE / n:g}" for n in ns))
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in dict.fromkeys(r["method"] for r in rows):
            mrows = {r["n"]: r for r in rows if r["method"] == method}
            any_row = next(iter(mrows.values()))
            mid = mrows.get(16, any_row)
            family = any_row.get("family", "")
            p = params.get("unet_full" if family in ("DDPM", "DDPM respaced", "DPM-Solver++") else "unet", 0)
            if family.startswith("FTDDM") or family == "flow":
                p = (params.get("unet", 0) if family != "flow" else 0) + params.get("flow", 0)
            if method == "zero-filled":
                p = 0
            cells = [method, str(any_row["nfe"]), f"{mid['seconds_per_map']:.3f}",
                     f"{speed.get(method, float('nan')):.1f}x" if method in speed else "-", f"{p / 1e6:.2f} M" if p else "-"]
            for part in ("all", "subset"):
                for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.3f}"), ("nrmse", "{:.3f}")):
                    vals = [mrows[n][part][metric] if n in mrows and part in mrows[n] else None for n in ns]
                    cells.append(" / ".join(fmt.format(v) if v is not None else "-" for v in vals))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path, n: int = 16) -> None:
    """Fig. 5-like: PSNR and SSIM (DDPM subset) versus NFE per method family, at one scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, protocol in enumerate(PROTOCOLS):
        rows = [r for r in results["runs"] if r["n"] == n and r["protocol"] == protocol and r["method"] != "zero-filled"]
        zf = next((r for r in results["runs"] if r["n"] == n and r["protocol"] == protocol and r["method"] == "zero-filled"), None)
        for row_i, metric in enumerate(("psnr", "ssim")):
            ax = axes[row_i, col]
            for fam in dict.fromkeys(r["family"] for r in rows):
                pts = sorted((r["nfe"], r["subset"][metric]) for r in rows if r["family"] == fam)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=fam)
            if zf is not None:
                ax.axhline(zf["subset"][metric], color="gray", ls="--", label="zero-filled")
            ax.set_xscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"s = {HR_SIZE / n:g}, mask protocol {protocol}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(results: dict, params: dict[str, int], out_dir: Path, stem: str = "quality") -> dict[str, Path]:
    """JSON + markdown + PNG under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}_vs_nfe.png"}
    results = {**results, "params": params, "speedup_vs_ddpm1000": _speedups(results)}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["md"].write_text(f"# Quality on the phantom test split\n\n{markdown(results, params)}\n")
    plot(results, paths["png"])
    return paths
