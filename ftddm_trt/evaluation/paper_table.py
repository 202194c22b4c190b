"""The quality results as the paper reports them: Table 1 (mean +- std, Wilcoxon p, speed-up at equal batch,
params) and Figs. 5-7, computed from the results record of ``evaluation.quality.run_quality``.

Every function here reads a results dict and nothing else, so it is tested on small synthetic records.

Record fields used (one entry of ``results["runs"]`` per (n, protocol, method)): ``n``, ``s``, ``protocol``,
``method``, ``family``, ``nfe``, ``maps`` (how many of the chosen maps it ran on: the first ``maps``),
``batch`` (maps per network call), ``seconds_per_map``, ``per_map`` ({metric: list, NaN for invalid maps}). A record
written before a metric existed (``sharpness`` in older files) shows ``-`` in that metric's columns.
Optional sweeps: ``results["tau_d_sweep"]`` (Fig. 7) and ``results["s_sweep"]`` (Fig. 6).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

METRICS: tuple[tuple[str, str, str], ...] = (
    ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("nrmse", "NRMSE", "{:.3f}"),
    ("sharpness", "sharpness", "{:.2f}"),
)
REFERENCE_METHOD = "FTDDM Ttrunc=100"
DDPM_METHOD = "DDPM T=1000"
HR_SIZE = 64


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1) of the finite values, and how many there were."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (``scipy.stats.wilcoxon``), over the pairs
    where both are finite. NaN when fewer than 2 pairs; 1.0 when every difference is zero."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = min(x.size, y.size)
    x, y = x[:n], y[:n]
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2:
        return math.nan
    if np.all(x == y):
        return 1.0
    return float(wilcoxon(x, y).pvalue)


def _rows(results: dict, n: int, protocol: str) -> dict[str, dict]:
    return {r["method"]: r for r in results["runs"] if r["n"] == n and r["protocol"] == protocol}


def speedups(results: dict) -> dict[str, dict[str, Any]]:
    """Per method: DDPM-1000's seconds per map over the method's, median over (s, protocol), only where both
    ran at the same batch size (``batch``); ``{"speedup": x or None, "batch": b, "ddpm_batch": b0}``."""
    out: dict[str, dict[str, Any]] = {}
    per: dict[str, list[float]] = {}
    for n in sorted({r["n"] for r in results["runs"]}):
        for p in sorted({r["protocol"] for r in results["runs"]}):
            rows = _rows(results, n, p)
            ref = rows.get(DDPM_METHOD)
            if ref is None:
                continue
            for name, r in rows.items():
                if r.get("seconds_per_map", 0) <= 0:
                    continue
                out.setdefault(name, {"batch": r.get("batch"), "ddpm_batch": ref.get("batch")})
                if r.get("batch") == ref.get("batch"):
                    per.setdefault(name, []).append(ref["seconds_per_map"] / r["seconds_per_map"])
    for name, info in out.items():
        info["speedup"] = float(np.median(per[name])) if name in per else None
    return out


def params_of(family: str, params: dict[str, int]) -> int:
    """Parameters a method runs: the full-chain UNet for the DDPM baselines, UNet + flow for FTDDM, UNet +
    generator for TDPM, the flow alone for flow-only, MUNet (and the enhancer's flow) for the one-shot
    baselines, 0 for zero-filling."""
    if family in ("DDPM", "DDPM respaced", "DPM-Solver++", "SDE-DPM-Solver++", "DPM-Solver++ variant"):
        return params.get("unet_full", 0)
    if family.startswith("FTDDM"):
        return params.get("unet", 0) + params.get("flow", 0)
    if family == "TDPM":
        return params.get("unet", 0) + params.get("tdpm", 0)
    if family == "flow":
        return params.get("flow", 0)
    if family == "MUNet-FS-cWGAN":
        return params.get("munet", 0)
    if family == "Flow Enhancer":
        return params.get("munet", 0) + params.get("flow_enhancer", 0)
    return 0


def table_rows(results: dict, n: int, protocol: str, params: dict[str, int]) -> list[dict[str, Any]]:
    """One dict per method at (n, protocol): mean/std per metric over the maps it ran, Wilcoxon p of the
    reference FTDDM against it (paired on those maps), NFE, s/map, batch, speed-up, params."""
    rows = _rows(results, n, protocol)
    ref = rows.get(REFERENCE_METHOD)
    speed = speedups(results)
    out = []
    for name, r in rows.items():
        cell: dict[str, Any] = {"method": name, "nfe": r["nfe"], "maps": r.get("maps", results.get("n_maps")),
                                "seconds_per_map": r.get("seconds_per_map", 0.0), "batch": r.get("batch"),
                                "params": params_of(r.get("family", ""), params),
                                "speedup": speed.get(name, {}).get("speedup")}
        for key, _, _ in METRICS:
            vals = r.get("per_map", {}).get(key, [])
            ref_vals = (ref or {}).get("per_map", {}).get(key, [])
            cell[key] = mean_std(vals)
            if name != REFERENCE_METHOD and vals and ref_vals:
                cell[f"p_{key}"] = wilcoxon_p(ref_vals[: len(vals)], vals)
        out.append(cell)
    return out


def _pm(ms: tuple[float, float, int], fmt: str) -> str:
    mean, sd, k = ms
    return "-" if k == 0 else f"{fmt.format(mean)} ± {fmt.format(sd)}"


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def markdown(results: dict, params: dict[str, int]) -> str:
    """Paper-style Table 1, one table per (protocol, s), with the protocol stated above them."""
    n_maps = results["n_maps"]
    ddpm_maps = results.get("ddpm_maps", n_maps)
    subset = (f"DDPM T=1000 ran on the first {ddpm_maps} of the {n_maps} maps only (a stated subset): its row and "
              f"its Wilcoxon test use those {ddpm_maps} maps" if ddpm_maps < n_maps else
              f"DDPM T=1000 ran on all {n_maps} maps")
    lines = [
        f"Test split subjects {', '.join(results['test_subjects'])}; {n_maps} maps per (s, protocol), the same maps "
        f"for every method; {subset}. Backend {results['backend'].get('backend')}, batch {results['batch_size']} "
        "for every method (the `batch` column is the maps per call actually used).",
        "",
        "Metrics are mean ± standard deviation over maps (inside the truth's quality mask). Sharpness is the mean "
        "gradient magnitude relative to the truth's (1 = as sharp as the truth, below 1 blurrier, above 1 noisier). "
        "`p` is the two-sided "
        f"Wilcoxon signed-rank p-value (scipy) of {REFERENCE_METHOD} against the row's method, paired per map. "
        "Speed-up = DDPM-1000's measured seconds per map / the method's, median over s and protocol, computed only "
        "where both ran at the same batch size (else `-`). Params: the networks the method runs.",
        "",
    ]
    lines += budget_lines(results.get("model", {}).get("manifest") or {})
    for protocol in sorted({r["protocol"] for r in results["runs"]}):
        for n in sorted({r["n"] for r in results["runs"]}, reverse=True):
            lines.append(f"### s = {HR_SIZE / n:g}, mask protocol `{protocol}`"
                         + (" (paper: 64x64 quality mask)" if protocol == "hr" else " (user: mask from N x N qc maps)"))
            lines.append("")
            head = ["method", "NFE", "maps", "batch", "s / map", "speed-up", "params"]
            for _, label, _ in METRICS:
                head += [label, f"p ({label})"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for c in table_rows(results, n, protocol, params):
                cells = [c["method"], str(c["nfe"]), str(c["maps"]), str(c["batch"] or "-"),
                         f"{c['seconds_per_map']:.3f}" if c["seconds_per_map"] else "-",
                         f"{c['speedup']:.1f}x" if c["speedup"] else "-",
                         f"{c['params'] / 1e6:.2f} M" if c["params"] else "-"]
                for key, _, fmt in METRICS:
                    cells += [_pm(c[key], fmt), _p(c.get(f"p_{key}"))]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    for title, key in (("tau_d sweep (Fig. 7)", "tau_d_sweep"), ("conditioning on s (Fig. 6)", "s_sweep")):
        sweep = results.get(key)
        if sweep:
            lines += [f"### {title}: {sweep['description']}", "", "| " + " | ".join(sweep["columns"]) + " |",
                      "|" + "---|" * len(sweep["columns"])]
            for row in sweep["rows"]:
                lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                               for c in sweep["columns"]) + " |")
            lines.append("")
    return "\n".join(lines)


def budget_lines(manifest: dict) -> list[str]:
    """The UNets' training budgets side by side (from the model manifest): iterations x batch, and the
    training images seen per timestep of the range each was trained on (t uniform in 1..t_max)."""
    out = []
    for name, t_default in (("unet", None), ("unet_full", 1000)):
        info = (manifest.get("networks") or {}).get(name) or {}
        cfg = info.get("train_config") or {}
        if not cfg or info.get("step") is None:
            continue
        t_max = t_default or int(cfg.get("t_trunc", 100))
        steps = int(info.get("cumulative_steps") or info["step"])
        seen = steps * int(cfg.get("batch_size", 0))
        earlier = (f" ({steps - int(info['step'])} of them in the runs it started from)"
                   if steps > int(info["step"]) else "")
        out.append(
            f"- `{name}` (t in 1..{t_max}): {steps} iterations{earlier} x batch {cfg.get('batch_size')} = {seen} "
            f"images, **{seen / t_max:.0f} per timestep**; best validation loss "
            f"{info.get('best_val', float('nan')):.4g}"
            + (
                f"; its last {info['stale_validations']} validations did not improve on the best"
                if info.get("stale_validations")
                else ""
            )
        )
    if out:
        out = ["Training budgets of the UNets (the DDPM / DPM-Solver++ baselines run `unet_full`, FTDDM and TDPM "
               "run `unet`):", "", *out, ""]
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_nfe(results: dict, path: Path, n: int = 16) -> Path:
    """Fig. 5: mean PSNR and SSIM (all maps each method ran) versus NFE, one line per method family."""
    plt = _plt()
    protocols = sorted({r["protocol"] for r in results["runs"]})
    fig, axes = plt.subplots(2, len(protocols), figsize=(5 * len(protocols), 7), squeeze=False)
    for col, protocol in enumerate(protocols):
        rows = [r for r in _rows(results, n, protocol).values() if r["method"] != "zero-filled"]
        zf = _rows(results, n, protocol).get("zero-filled")
        for row_i, metric in enumerate(("psnr", "ssim")):
            ax = axes[row_i, col]
            for fam in dict.fromkeys(r.get("family", r["method"]) for r in rows):
                pts = sorted(
                    (r["nfe"], mean_std(r["per_map"][metric])[0]) for r in rows if r.get("family", r["method"]) == fam
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=fam)
            if zf is not None:
                ax.axhline(mean_std(zf["per_map"][metric])[0], color="gray", ls="--", label="zero-filled")
            ax.set_xscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"s = {HR_SIZE / n:g}, mask protocol {protocol}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_conditioning_on_s(results: dict, path: Path, methods: Sequence[str] | None = None) -> Path:
    """Fig. 6: PSNR versus the upscaling factor s per method (left), and, when ``s_sweep`` is present, PSNR of
    the same inputs when the network is told another s than the true one (right)."""
    plt = _plt()
    sweep = results.get("s_sweep")
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6, 4), squeeze=False)
    ax = axes[0, 0]
    protocol = "hr" if any(r["protocol"] == "hr" for r in results["runs"]) else results["runs"][0]["protocol"]
    names = methods or list(dict.fromkeys(r["method"] for r in results["runs"] if r["protocol"] == protocol))
    for name in names:
        pts = sorted((r["s"], mean_std(r["per_map"]["psnr"])[0]) for r in results["runs"]
                     if r["method"] == name and r["protocol"] == protocol)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("upscaling factor s")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"quality versus s (protocol {protocol})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    if sweep:
        ax = axes[0, 1]
        for true_s in sorted({row["true_s"] for row in sweep["rows"]}):
            pts = sorted((row["given_s"], row["psnr"]) for row in sweep["rows"] if row["true_s"] == true_s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"true s = {true_s:g}")
            ax.axvline(true_s, color="gray", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("s given to the networks")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(sweep.get("method", "conditioning on s"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_tau_d(results: dict, path: Path) -> Path:
    """Fig. 7: fidelity (PSNR) against sharpness (``data.metrics.sharpness``, mean over maps) as tau_d varies."""
    plt = _plt()
    sweep = results.get("tau_d_sweep")
    if not sweep:
        raise ValueError("the results hold no tau_d_sweep")
    rows = sorted(sweep["rows"], key=lambda r: r["tau_d"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["tau_d"] for r in rows], [r["psnr"] for r in rows], "o-", label="PSNR")
    axes[0].set_xlabel("tau_d")
    axes[0].set_ylabel("PSNR (dB)")
    twin = axes[0].twinx()
    twin.plot([r["tau_d"] for r in rows], [r["sharpness"] for r in rows], "s--", color="C1", label="sharpness")
    twin.set_ylabel("sharpness (gradient magnitude / truth's)")
    axes[0].set_title(sweep.get("method", "tau_d"))
    axes[1].plot([r["sharpness"] for r in rows], [r["psnr"] for r in rows], "o-")
    for r in rows:
        axes[1].annotate(f"{r['tau_d']:g}", (r["sharpness"], r["psnr"]), fontsize=8)
    axes[1].axvline(1.0, color="gray", lw=0.5)
    axes[1].set_xlabel("sharpness (1 = the truth's)")
    axes[1].set_ylabel("PSNR (dB)")
    axes[1].set_title("fidelity versus sharpness")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = [
    "budget_lines",
    "markdown",
    "mean_std",
    "params_of",
    "plot_conditioning_on_s",
    "plot_quality_vs_nfe",
    "plot_tau_d",
    "speedups",
    "table_rows",
    "wilcoxon_p",
]
