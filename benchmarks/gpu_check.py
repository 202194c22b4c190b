"""The one command to run on a machine with an NVIDIA GPU: correctness and speed of the CUDA paths.

    PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/results/gpu

Runs from the source tree on a bare host (Python 3.12, PyTorch with CUDA, numpy 2, onnx, onnxruntime CPU,
no network, no TensorRT). It imports only torch, numpy and the parts of ftddm_trt that need nothing else
(no nibabel, nilearn, scipy, typer, rich, tritonclient; weights are read without the safetensors package
when it is absent). Inputs are synthetic: smooth positive maps inside an elliptical mask, k-space
truncated to 16 x 16 (s = 4) exactly as the pipeline does, with T1/FLAIR-like channels from the same
maps; the truth is known, so PSNR is measured against it (PSNR = 10 log10(max truth^2 / MSE) inside the
mask, per map, averaged).

Measures (each section guarded: an error or the time budget records a skipped row, never a crash):

1. every sampler on CUDA in fp32, fp16 and bf16 (autocast) against the CPU fp32 output for the same
   seed: max |CUDA - CPU|, PSNR of each against the truth and the drift in dB;
2. CUDA-graph capture of the whole truncated loop (FTDDM Ttrunc = 100, 100 UNet calls in one graph):
   equality with the eager loop and the time per loop;
3. torch.compile of the UNet: compile time, equality, ms per NFE versus eager;
4. ms per NFE per image at batch 1..128 for the shipped and the paper-size UNet (random weights), fp32
   (TF32 off and on) and fp16;
5. latency per map and per slice (7 metabolite maps) of FTDDM-101 and FTDDM + DPM-Solver++ 10, at
   batch 1 and over a whole volume (32 slices x 7 maps in batches of 128 / 224);
6. peak GPU memory of each section.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``. On a machine without a CUDA GPU it stops at once
with a message and exit code 2. Sized for about 6 minutes on one H100/H200 (budget ``--minutes``, default 7).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

EXIT_NO_GPU = 2
METABOLITE_MAPS_PER_SLICE = 7


def cuda_or_exit() -> None:
    """Stop at once (exit 2, clear message) unless torch sees a CUDA device."""
    try:
        import torch
    except ImportError:
        print("gpu_check: PyTorch is not installed; this check needs PyTorch with CUDA.", file=sys.stderr)
        raise SystemExit(EXIT_NO_GPU)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run this on a machine with an NVIDIA GPU.",
              file=sys.stderr)
        raise SystemExit(EXIT_NO_GPU)


# -- inputs ----------------------------------------------------------------------------------------
def synthetic_batch(k: int, seed: int = 0, n_lr: int = 16):
    """k maps: (y (k,4,64,64) condition, s (k,), truth (k,64,64) normalized, mask (k,64,64) bool)."""
    import numpy as np
    import torch

    from ftddm_trt.constants import HR_SIZE
    from ftddm_trt.data.kspace import kspace_truncate

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HR_SIZE, 0:HR_SIZE].astype(np.float32)
    truth = np.zeros((k, HR_SIZE, HR_SIZE), np.float32)
    mask = np.zeros((k, HR_SIZE, HR_SIZE), bool)
    for i in range(k):
        cy, cx = 32 + rng.uniform(-3, 3, 2)
        ry, rx = rng.uniform(20, 27, 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img = np.full((HR_SIZE, HR_SIZE), rng.uniform(0.5, 1.0), np.float32)
        for _ in range(6):
            by, bx = rng.uniform(14, 50, 2)
            w = rng.uniform(3, 9)
            img += rng.uniform(-0.4, 0.8) * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * w * w))
        truth[i] = np.clip(img, 0.05, None) * m
        mask[i] = m
    zf = kspace_truncate(truth, n_lr)[1].astype(np.float32)
    scale = np.array([np.quantile(z[m], 0.99) for z, m in zip(zf, mask)], np.float32)[:, None, None]
    zf, truth_n = zf / scale, truth / scale
    t1 = np.clip(0.6 + 0.3 * truth_n, 0, 1) * mask
    flair = np.clip(0.4 + 0.2 * (1.5 - truth_n), 0, 1) * mask
    y = np.stack([zf * mask, mask.astype(np.float32), t1, flair], axis=1).astype(np.float32)
    s = np.full(k, HR_SIZE / n_lr, np.float32)
    return torch.from_numpy(y), torch.from_numpy(s), truth_n.astype(np.float32), mask


def psnr(pred, truth, mask) -> float:
    """Mean over maps of 10 log10(max truth^2 / MSE inside the mask)."""
    import numpy as np

    vals = []
    for p, t, m in zip(pred, truth, mask):
        mse = float(np.mean((p[m] - t[m]) ** 2))
        vals.append(10 * math.log10(float(t[m].max()) ** 2 / max(mse, 1e-20)))
    return float(np.mean(vals))


# -- timing ----------------------------------------------------------------------------------------
def cuda_ms(fn: Callable[[], Any], warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn`` in ms, measured with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


class Budget:
    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


def section(name: str, results: dict, budget: Budget, need_s: float, fn: Callable[[], Any]) -> None:
    """Run one section; record its result, or why it was skipped (error, time budget), and its peak memory."""
    import torch

    if budget.left() < need_s:
        results[name] = {"skipped": f"time budget: {budget.left():.0f} s left, section needs about {need_s:.0f} s"}
        print(f"[{name}] skipped (time budget)", flush=True)
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    print(f"[{name}] ...", flush=True)
    try:
        out = fn()
        results[name] = {"result": out}
    except Exception as err:  # a failing section is a finding, not a crash
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
        print(f"[{name}] ERROR {type(err).__name__}: {err}", flush=True)
    results[name]["seconds"] = round(time.monotonic() - t0, 2)
    results[name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


# -- sections --------------------------------------------------------------------------------------
SAMPLER_SPECS = [("ftddm", {}), ("ftddm-dpmpp", {"steps": 20}), ("ftddm-dpmpp", {"steps": 10}), ("ddpm", {}),
                 ("ddpm-respaced", {"steps": 100}), ("dpmpp", {"steps": 20}), ("flow", {})]


def samplers_vs_cpu(models, k: int = 16, seed: int = 3) -> list[dict]:
    import numpy as np
    import torch

    from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
    from ftddm_trt.engine.torch_backend import TorchBackend

    y, s, truth, mask = synthetic_batch(k, seed=1)
    cpu = TorchBackend(models, device="cpu")
    gpus = {p: TorchBackend(models, device="cuda", precision=p) for p in ("fp32", "fp16", "bf16")}
    rows = []
    for name, kw in SAMPLER_SPECS:
        spec = SamplerSpec(name, **kw)
        t0 = time.perf_counter()
        ref, nfe = sample_images(cpu, spec, y, s, batch_size=k, seed=seed)
        cpu_s = time.perf_counter() - t0
        ref_np = ref[:, 0].numpy()
        row = {"sampler": name, "steps": spec.n_steps, "nfe": nfe, "cpu_fp32_psnr": psnr(ref_np, truth, mask),
               "cpu_s_per_map": cpu_s / k}
        for p, backend in gpus.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, _ = sample_images(backend, spec, y, s, batch_size=k, seed=seed)
            torch.cuda.synchronize()
            out_np = out[:, 0].numpy()
            row[f"cuda_{p}"] = {"max_abs_vs_cpu": float(np.abs(out_np - ref_np).max()),
                                "psnr_vs_cpu_output": psnr(out_np, ref_np, mask),
                                "psnr": psnr(out_np, truth, mask),
                                "drift_db": psnr(out_np, truth, mask) - row["cpu_fp32_psnr"],
                                "s_per_map": (time.perf_counter() - t0) / k}
        rows.append(row)
    return rows


def cuda_graph_truncated_loop(models, batch: int = 16) -> dict:
    """Capture the 100 UNet calls of FTDDM's truncated chain (pre-drawn noise) in one CUDA graph."""
    import torch

    from ftddm_trt.constants import T_DIFFUSION, T_TRUNC
    from ftddm_trt.diffusion import CosineSchedule, ancestral_sample, draw_ancestral_noise, truncated_timesteps

    nets = models.load_torch()
    unet, flow = nets["unet"].cuda().eval(), nets["flow"].cuda().eval()
    y, s, _, _ = synthetic_batch(batch, seed=2)
    y, s = y.cuda(), s.cuda()
    mask = y[:, 1:2]
    sched = CosineSchedule(T_DIFFUSION)
    ts = truncated_timesteps(T_TRUNC)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        eps0 = torch.randn((batch, 1, 64, 64), generator=gen).cuda()
        x_start = flow.reverse(eps0, y, torch.full((batch,), 0.9, device="cuda")) * mask
    noise = draw_ancestral_noise(len(ts), x_start, gen)

    def eps_fn(x, t):
        return unet(x, y, t, s)

    def loop():
        with torch.no_grad():
            return ancestral_sample(eps_fn, x_start, mask, sched, ts, noise=noise, clip=(0.0, 3.0)).x0

    eager = loop()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(graph):
        static_out = loop()
    capture_s = time.perf_counter() - t0
    graph.replay()
    torch.cuda.synchronize()
    diff = float((static_out - eager).abs().max())
    eager_ms = cuda_ms(loop, warmup=1, iters=3)
    graph_ms = cuda_ms(graph.replay, warmup=1, iters=5)
    return {"batch": batch, "unet_calls": len(ts), "capture_s": capture_s, "max_abs_graph_vs_eager": diff,
            "eager_ms_per_loop": eager_ms, "graph_ms_per_loop": graph_ms,
            "graph_ms_per_map": graph_ms / batch, "speedup": eager_ms / graph_ms}


def compile_unet(models, batch: int = 16) -> dict:
    import torch

    from ftddm_trt.export.onnx_export import random_inputs

    unet = models.load_torch()["unet"].cuda().eval()
    feeds = [v.cuda() for v in random_inputs("unet", batch, torch.Generator().manual_seed(0)).values()]
    with torch.no_grad():
        ref = unet(*feeds)
        eager_ms = cuda_ms(lambda: unet(*feeds), warmup=3, iters=10)
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        out = compiled(*feeds)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        comp_ms = cuda_ms(lambda: compiled(*feeds), warmup=3, iters=10)
    return {"batch": batch, "compile_s": compile_s, "max_abs_vs_eager": float((out - ref).abs().max()),
            "eager_ms_per_nfe_per_image": eager_ms / batch, "compiled_ms_per_nfe_per_image": comp_ms / batch,
            "speedup": eager_ms / comp_ms}


def per_nfe(models, budget: Budget, batches=(1, 2, 4, 8, 16, 32, 64, 128)) -> list[dict]:
    import torch

    from ftddm_trt.export.onnx_export import random_inputs
    from ftddm_trt.models import DenoisingUNet, UNetConfig

    nets = {"shipped": models.load_torch()["unet"], "paper": DenoisingUNet(UNetConfig.preset("paper"))}
    rows = []
    for label, net in nets.items():
        net = net.cuda().eval()
        n_params = sum(p.numel() for p in net.parameters())
        for mode in ("fp32", "tf32", "fp16"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
            ctx = torch.autocast("cuda", dtype=torch.float16) if mode == "fp16" else nullcontext()
            for b in batches:
                if budget.left() < 45:
                    rows.append({"net": label, "mode": mode, "batch": b, "skipped": "time budget"})
                    continue
                feeds = [v.cuda() for v in random_inputs("unet", b, torch.Generator().manual_seed(b)).values()]
                with torch.no_grad(), ctx:
                    ms = cuda_ms(lambda: net(*feeds), warmup=2, iters=5)
                rows.append({"net": label, "params": n_params, "mode": mode, "batch": b, "ms_per_call": ms,
                             "ms_per_nfe_per_image": ms / b})
        net.cpu()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # back to this check's fp32
    return rows


def latency(models, slices: int = 32) -> list[dict]:
    import torch

    from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
    from ftddm_trt.engine.torch_backend import TorchBackend

    k = slices * METABOLITE_MAPS_PER_SLICE
    y, s, _, _ = synthetic_batch(k, seed=4)
    rows = []
    for prec in ("fp32", "fp16"):
        backend = TorchBackend(models, device="cuda", precision=prec)
        for spec in (SamplerSpec("ftddm"), SamplerSpec("ftddm-dpmpp", steps=10)):
            for label, n, batch in (("batch 1", 3, 1), ("volume, batch 128", k, 128), ("volume, batch 224", k, k)):
                sample_images(backend, spec, y[:batch], s[:batch], batch_size=batch, seed=0)  # warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                sample_images(backend, spec, y[:n], s[:n], batch_size=batch, seed=0)
                torch.cuda.synchronize()
                per_map = (time.perf_counter() - t0) / n
                rows.append({"precision": prec, "sampler": spec.name, "nfe": spec.nfe, "case": label, "maps": n,
                             "s_per_map": per_map, "s_per_slice": per_map * METABOLITE_MAPS_PER_SLICE})
    return rows


def tensorrt_rows() -> dict:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return {"skipped": "the tensorrt package is not importable on this host"}
    import tensorrt

    return {"skipped": f"TensorRT {tensorrt.__version__} is importable, but this check does not build engines "
                       "(use `ftddm-trt export` then `ftddm-trt build-engine`, which verifies fp16 against fp32)"}


# -- report ----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [
        f"# GPU check ({report['machine']['gpu']})",
        "",
        f"torch {report['machine']['torch']}, CUDA {report['machine']['cuda']}, Python {report['machine']['python']}; "
        f"total {report['seconds']:.0f} s. Written by `benchmarks/gpu_check.py`.",
        "",
    ]
    sec = report["sections"]

    def status(name):
        d = sec.get(name, {})
        if "result" in d:
            return None
        return d.get("skipped") or d.get("error") or "not run"

    lines += ["## Samplers on CUDA vs CPU fp32 (same seed, 16 synthetic maps, s = 4)", ""]
    if status("samplers") is None:
        lines += [
            "| sampler | NFE | CPU PSNR | fp32: max abs / drift dB | fp16: max abs / drift dB | bf16: max abs / drift "
            "dB |",
            "|---|---|---|---|---|---|",
        ]
        for r in sec["samplers"]["result"]:
            cells = [
                f"{r[f'cuda_{p}']['max_abs_vs_cpu']:.2e} / {r[f'cuda_{p}']['drift_db']:+.3f}"
                for p in ("fp32", "fp16", "bf16")
            ]
            name = r["sampler"] + (f" {r['steps']}" if r["steps"] else "")
            lines.append(f"| {name} | {r['nfe']} | {r['cpu_fp32_psnr']:.2f} | " + " | ".join(cells) + " |")
    else:
        lines.append(f"not measured: {status('samplers')}")
    lines += ["", "## CUDA graph of the truncated loop (FTDDM Ttrunc = 100)", ""]
    if status("cuda_graph") is None:
        g = sec["cuda_graph"]["result"]
        lines.append(
            f"batch {g['batch']}: eager {g['eager_ms_per_loop']:.1f} ms, graph {g['graph_ms_per_loop']:.1f} ms per "
            f"loop ({g['speedup']:.2f}x), max |graph - eager| = {g['max_abs_graph_vs_eager']:.2e}"
        )
    else:
        lines.append(f"not measured: {status('cuda_graph')}")
    lines += ["", "## torch.compile (shipped UNet)", ""]
    if status("torch_compile") is None:
        c = sec["torch_compile"]["result"]
        lines.append(
            f"batch {c['batch']}: compile {c['compile_s']:.1f} s; eager {c['eager_ms_per_nfe_per_image']:.4f} vs "
            f"compiled {c['compiled_ms_per_nfe_per_image']:.4f} ms per NFE per image ({c['speedup']:.2f}x); max |diff| "
            f"{c['max_abs_vs_eager']:.2e}"
        )
    else:
        lines.append(f"not measured: {status('torch_compile')}")
    lines += ["", "## ms per NFE per image", ""]
    if status("per_nfe") is None:
        rows = [r for r in sec["per_nfe"]["result"] if "ms_per_nfe_per_image" in r]
        batches = sorted({r["batch"] for r in rows})
        lines += ["| net | mode | " + " | ".join(f"b={b}" for b in batches) + " |", "|---|---|" + "---|" * len(batches)]
        for net in ("shipped", "paper"):
            for mode in ("fp32", "tf32", "fp16"):
                by_b = {r["batch"]: r["ms_per_nfe_per_image"] for r in rows if r["net"] == net and r["mode"] == mode}
                if by_b:
                    lines.append(
                        f"| {net} | {mode} | "
                        + " | ".join(f"{by_b[b]:.4f}" if b in by_b else "-" for b in batches)
                        + " |"
                    )
    else:
        lines.append(f"not measured: {status('per_nfe')}")
    lines += ["", "## Latency (s per map / s per slice of 7 maps)", ""]
    if status("latency") is None:
        lines += ["| precision | sampler | NFE | case | s / map | s / slice |", "|---|---|---|---|---|---|"]
        for r in sec["latency"]["result"]:
            lines.append(
                f"| {r['precision']} | {r['sampler']} | {r['nfe']} | {r['case']} | {r['s_per_map']:.4f} | "
                f"{r['s_per_slice']:.4f} |"
            )
    else:
        lines.append(f"not measured: {status('latency')}")
    lines += ["", "## Peak GPU memory (MiB) and time per section", "",
              "| section | peak MiB | seconds | status |", "|---|---|---|---|"]
    for name, d in sec.items():
        lines.append(f"| {name} | {d.get('peak_gpu_mib', '-')} | {d.get('seconds', '-')} | {status(name) or 'ok'} |")
    lines += ["", f"TensorRT: {sec.get('tensorrt', {}).get('result', {}).get('skipped', 'see JSON')}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--minutes", type=float, default=7.0, help="time budget; sections that do not fit are skipped")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    args = parser.parse_args(argv)
    cuda_or_exit()  # before anything else: a CPU machine stops here

    import torch

    from ftddm_trt.models.model_set import ModelSet

    t_start = time.monotonic()
    budget = Budget(args.minutes)
    # fp32 means fp32 (no TF32 in matmuls or convolutions) unless a row says tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    models = ModelSet.open(args.model)
    report: dict[str, Any] = {
        "machine": {"gpu": torch.cuda.get_device_name(torch.cuda.current_device()), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": platform.python_version(), "host": platform.node(),
                    "cpu_threads": torch.get_num_threads()},
        "model": str(models.root), "sections": {}}
    sec = report["sections"]
    section("samplers", sec, budget, 90, lambda: samplers_vs_cpu(models))
    section("cuda_graph", sec, budget, 20, lambda: cuda_graph_truncated_loop(models))
    section("latency", sec, budget, 40, lambda: latency(models))
    section("per_nfe", sec, budget, 60, lambda: per_nfe(models, budget))
    section("torch_compile", sec, budget, 90, lambda: compile_unet(models))
    section("tensorrt", sec, budget, 0, tensorrt_rows)
    report["seconds"] = time.monotonic() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=str)),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
