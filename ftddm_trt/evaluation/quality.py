"""Quality versus NFE on the phantom test split (the shape of the paper's Table 1 and Fig. 5).

For each upscaling factor s in (8, 4, 2) and each mask protocol (``hr``: the paper's 64x64 quality
mask; ``lr``: the mask a user has, from N x N qc maps), the same maps of the test split are
super-resolved by every method on one backend in one run. Metrics (NRMSE / PSNR / SSIM / sharpness) are
computed per map inside the truth's quality mask, in file units, and kept per map (for the standard deviations and
the paired Wilcoxon tests of ``evaluation.paper_table``). Seconds per map are wall time of the whole batched loop
divided by the number of maps; every method runs at the same batch size, so the speed-up over DDPM-1000 is
a ratio at equal batch. DDPM-1000 runs on all maps unless ``ddpm_maps`` names a smaller subset (the first
``ddpm_maps`` maps, at least one batch), which the table then states.
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
from ftddm_trt.data.examples import SlicePool, pool_stack, prepare_example
from ftddm_trt.data.phantom import fold_split, generate_dataset
from ftddm_trt.diffusion import DEFAULT_LAMBDA_MIN
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for, sample_images
from ftddm_trt.evaluation import paper_table
from ftddm_trt.evaluation.report import portable
from ftddm_trt.evaluation.volumes import MIN_VOXELS, map_metrics, summarize

SCALES: tuple[int, ...] = (8, 16, 32)  # N for s = 8, 4, 2
PROTOCOLS: tuple[str, ...] = ("hr", "lr")


@dataclass(frozen=True)
class Method:
    """One row of the quality table: a sampler setting (``spec``) under its label, and its family."""

    label: str
    spec: SamplerSpec
    family: str


def paper_methods(include_ddpm: bool = True, ftddm_ttruncs: tuple[int, ...] = (100,),
                  clip_x0: tuple[float, float] | None = (0.0, 3.0), lambda_min: float | None = DEFAULT_LAMBDA_MIN,
                  solver_variants: bool = True, tdpm: bool = False, munet: bool = False,
                  flow_enhancer: bool = False, distilled_steps: int | None = None) -> list[Method]:
    """The rows of the paper's Table 1 / Table 4; FTDDM at each Ttrunc a flow was trained for.

    ``clip_x0`` and ``lambda_min`` are every row's settings (SamplerSpec); ``solver_variants`` adds
    DPM-Solver++ 100 from noise with the other choice of each (the baselines with and without the clips);
    ``tdpm`` adds the TDPM row (GAN generator of x_100, then the truncated chain); ``munet`` and
    ``flow_enhancer`` the one-shot baselines MUNet-FS-cWGAN and Flow Enhancer (at the flow's mode,
    ``tau_f = 0``); ``distilled_steps`` the model's distilled student (``upscale``'s default sampler).
    DPM-Solver++ from noise runs in both forms: the ODE (deterministic, the paper's) and the SDE (fresh noise
    scaled by tau_d, as the DDPM rows).
    """
    def spec(name: str, **kw) -> SamplerSpec:
        return SamplerSpec(name, **{"clip_x0": clip_x0, "lambda_min": lambda_min, **kw})

    rows = []
    if include_ddpm:
        rows.append(Method("DDPM T=1000", spec("ddpm"), "DDPM"))
    rows += [Method(f"DDPM respaced {k}", spec("ddpm-respaced", steps=k), "DDPM respaced") for k in (100, 50, 20)]
    rows += [Method(f"DPM-Solver++ {k}", spec("dpmpp", steps=k), "DPM-Solver++") for k in (100, 20, 10)]
    # the SDE form (diffusers' sde-dpmsolver++), with the DDPM rows' tau_d on its fresh noise
    rows += [
        Method(f"SDE-DPM-Solver++ {k}", spec("dpmpp", steps=k, sde=True), "SDE-DPM-Solver++") for k in (100, 20, 10)
    ]
    if solver_variants:
        other_clip = None if clip_x0 is not None else (0.0, 3.0)
        other_lambda = None if lambda_min is not None else DEFAULT_LAMBDA_MIN
        rows.append(
            Method(
                f"DPM-Solver++ 100, clip_x0={_fmt_opt(other_clip)}",
                spec("dpmpp", steps=100, clip_x0=other_clip),
                "DPM-Solver++ variant",
            )
        )
        rows.append(Method(f"DPM-Solver++ 100, lambda_min={_fmt_opt(other_lambda)}",
                           spec("dpmpp", steps=100, lambda_min=other_lambda), "DPM-Solver++ variant"))
    if tdpm:
        rows.append(Method("TDPM Ttrunc=100", spec("tdpm", ttrunc=100), "TDPM"))
    rows += [Method(f"FTDDM Ttrunc={t}", spec("ftddm", ttrunc=t), "FTDDM") for t in ftddm_ttruncs]
    rows += [Method(f"FTDDM + DPM-Solver++ {k}", spec("ftddm-dpmpp", ttrunc=100, steps=k), "FTDDM + DPM-Solver++")
             for k in (50, 20, 10)]
    if distilled_steps is not None:
        rows.append(Method(f"FTDDM distilled, {distilled_steps} steps",
                           spec("ftddm-distilled", ttrunc=100, steps=distilled_steps, tau_f=0.0), "FTDDM distilled"))
    rows.append(Method("flow only (tau_f=0)", spec("flow", tau_f=0.0), "flow"))
    if munet:
        rows.append(Method("MUNet-FS-cWGAN", spec("munet"), "MUNet-FS-cWGAN"))
    if flow_enhancer:
        rows.append(Method("Flow Enhancer (tau_f=0)", spec("flow-enhancer", tau_f=0.0), "Flow Enhancer"))
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


def _per_map(met: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in met.items()}


def run_quality(
    backend: Backend,
    methods: list[Method],
    n_maps: int = 64,
    ddpm_maps: int | None = None,
    batch_size: int = 32,
    scales: tuple[int, ...] = SCALES,
    protocols: tuple[str, ...] = PROTOCOLS,
    seed: int = 0,
    log: Callable[[str], None] = print,
    flow_backends: dict[int | str, Backend] | None = None,
    tau_d_sweep: tuple[float, ...] = (),
    s_sweep: tuple[float, ...] = (),
    sweep_n: int = 16,
) -> dict:
    """Run every method on every (scale, protocol); returns the full results record.

    ``flow_backends`` maps a Ttrunc to a backend whose flow was trained for it (same UNets), ``"tdpm"``
    to one serving the TDPM generator and ``"distilled"`` to one serving the distilled student; start-point
    methods run there, everything else on ``backend``.
    ``ddpm_maps`` (None: all) limits DDPM T=1000 to the first maps. ``tau_d_sweep`` (Fig. 7) reruns
    FTDDM Ttrunc=100 at N = ``sweep_n``, protocol hr, with each tau_d; ``s_sweep`` (Fig. 6) runs FTDDM +
    DPM-Solver++ 20 there telling the networks each s instead of the true one.
    """
    flow_backends = flow_backends or {}
    pool, idx, test_ids = test_maps(n_maps, seed=seed)
    k_ddpm = idx.size if ddpm_maps is None else min(max(ddpm_maps, 1), idx.size)
    results: dict = {"test_subjects": test_ids, "n_maps": int(idx.size), "ddpm_maps": int(k_ddpm),
                     "map_indices": idx.tolist(), "batch_size": batch_size, "seed": seed, "backend": backend.describe(),
                     "runs": []}

    def runner_for(spec: SamplerSpec) -> Backend:
        if spec.name == "tdpm":
            if "tdpm" not in flow_backends:
                raise ValueError("a TDPM row needs flow_backends['tdpm'] (a backend serving the TDPM generator)")
            return flow_backends["tdpm"]
        if spec.distilled_unet:
            if "distilled" not in flow_backends:
                raise ValueError("a distilled row needs flow_backends['distilled'] (a backend of the student)")
            return flow_backends["distilled"]
        return flow_backends.get(spec.ttrunc, backend) if spec.uses_flow else backend

    warmed: set[str] = set()

    def sample(spec: SamplerSpec, y, s, k: int, scale) -> tuple[np.ndarray, int, float]:
        key = repr(spec)
        if key not in warmed:  # one untimed map first: session creation and first-call set-up are not the method's
            sample_images(runner_for(spec), spec, y[:1], s[:1], batch_size=1, seed=seed)
            warmed.add(key)
        t0 = time.perf_counter()
        x, nfe = sample_images(runner_for(spec), spec, y[:k], s[:k], batch_size=batch_size, seed=seed)
        seconds = time.perf_counter() - t0
        return np.clip(x[:, 0].numpy() * scale[:k, None, None], 0.0, None), nfe, seconds

    for n in scales:
        for protocol in protocols:
            y, s, scale, truth, region, zf = example_tensors(pool, idx, n, protocol)
            zf_metrics = map_metrics(zf, truth, region)
            base = {"n": n, "s": HR_SIZE / n, "protocol": protocol}
            results["runs"].append({**base, "method": "zero-filled", "family": "zero-filled", "nfe": 0,
                                    "maps": int(idx.size), "batch": None, "seconds_per_map": 0.0,
                                    "all": summarize(zf_metrics), "per_map": _per_map(zf_metrics)})
            for m in methods:
                k = k_ddpm if m.spec.name == "ddpm" else idx.size
                spec = consistency_for(m.spec, "auto", fine_mask=protocol == "hr")  # what upscale does by default
                pred, nfe, seconds = sample(spec, y, s, k, scale)
                met = map_metrics(pred, truth[:k], region[:k])
                row = {**base, "method": m.label, "family": m.family, "spec": spec.to_dict(), "nfe": nfe,
                       "maps": k, "batch": min(batch_size, k), "seconds_per_map": seconds / k,
                       "all": summarize(met), "per_map": _per_map(met)}
                results["runs"].append(row)
                log(f"N={n:2d} {protocol} {m.label:36s} NFE {nfe:4d}  {seconds / k:7.3f} s/map  "
                    f"PSNR {row['all']['psnr']:.2f} sharpness {row['all']['sharpness']:.2f} on {k} maps")
    if tau_d_sweep or s_sweep:
        y, s, scale, truth, region, _ = example_tensors(pool, idx, sweep_n, "hr")
        k = idx.size
    if tau_d_sweep:
        rows = []
        for tau in tau_d_sweep:
            spec = consistency_for(SamplerSpec("ftddm", ttrunc=100, tau_d=float(tau)), "auto", fine_mask=True)
            pred, _, _ = sample(spec, y, s, k, scale)
            summ = summarize(map_metrics(pred, truth, region))
            rows.append({"tau_d": float(tau), **{key: summ[key] for key in ("psnr", "ssim", "sharpness")}})
            log(f"tau_d {tau:g}: PSNR {summ['psnr']:.2f} sharpness {rows[-1]['sharpness']:.3f}")
        results["tau_d_sweep"] = {
            "method": "FTDDM Ttrunc=100",
            "description": f"FTDDM Ttrunc=100 at s = {HR_SIZE / sweep_n:g}, "
            f"protocol hr, {k} maps, data consistency on; sharpness = mean gradient magnitude / the truth's, "
            "mean over maps",
            "columns": ["tau_d", "psnr", "ssim", "sharpness"],
            "rows": rows,
        }
    if s_sweep:
        rows = []
        for given in s_sweep:
            # no data consistency: it would impose the band of the s given, not test the networks' conditioning on it
            spec = SamplerSpec("ftddm-dpmpp", ttrunc=100, steps=20, data_consistency=False)
            pred, _, _ = sample(spec, y, torch.full_like(s, float(given)), k, scale)
            summ = summarize(map_metrics(pred, truth, region))
            rows.append(
                {"true_s": HR_SIZE / sweep_n, "given_s": float(given), "psnr": summ["psnr"], "ssim": summ["ssim"]}
            )
            log(f"s given {given:g} (true {HR_SIZE / sweep_n:g}): PSNR {summ['psnr']:.2f}")
        results["s_sweep"] = {
            "method": "FTDDM + DPM-Solver++ 20",
            "description": f"FTDDM + DPM-Solver++ 20 on the s = "
            f"{HR_SIZE / sweep_n:g} inputs (protocol hr, {k} maps, no data consistency), the networks told s = given_s",
            "columns": ["true_s", "given_s", "psnr", "ssim"],
            "rows": rows,
        }
    return results


def write_results(results: dict, params: dict[str, int], out_dir: Path, stem: str = "quality") -> dict[str, Path]:
    """JSON + markdown (Table 1) + the figures (Fig. 5 always; Figs. 6 and 7 as the sweeps allow) under
    ``out_dir``. Paths inside the record are made portable (no absolute paths of this machine)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = portable({**results, "params": params, "speedup_vs_ddpm1000": paper_table.speedups(results)})
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "fig5": out_dir / f"{stem}_vs_nfe.png",
             "fig6": out_dir / f"{stem}_vs_s.png"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["md"].write_text(f"# Quality on the phantom test split\n\n{paper_table.markdown(results, params)}\n")
    paper_table.plot_quality_vs_nfe(results, paths["fig5"])
    paper_table.plot_conditioning_on_s(results, paths["fig6"])
    if results.get("tau_d_sweep"):
        paths["fig7"] = paper_table.plot_tau_d(results, out_dir / f"{stem}_tau_d.png")
    return paths
