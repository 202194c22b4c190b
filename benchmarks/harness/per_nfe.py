"""Milliseconds per network evaluation (NFE) per image, next to what the hardware can do.

For each model (the shipped one, and the paper-size UNet with random weights), each backend and each
batch size, one UNet call is timed (median of interleaved repeats) and reported as

- ms per call and ms per NFE per image (= ms per call / batch);
- GFLOP per image per forward (``hardware.model_flops``), achieved GFLOP/s and the fraction of the
  measured matmul peak (``hardware.peak_matmul_gflops`` at the same thread count; GPU rows against a
  GPU GEMM peak of the matching precision).

Then the pipeline's overhead over pure network time: ``sample_images`` over a whole phantom volume
(Z x 7 maps) with the ftddm sampler through ``Timing.TimedBackend``; overhead = (wall - network) / wall,
target < 5 %.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images
from ftddm_trt.evaluation.report import fmt, md_table, portable_path
from ftddm_trt.models.model_set import ModelSet

from . import hardware
from .hardware import machine_lines
from .timing import NOISE_NOTE, TimedBackend, Timing, cuda_sync, interleaved_times
from .workloads import (
    cached_onnx_export,
    close_all,
    default_backends,
    open_backends,
    paper_unet,
    phantom_condition,
    smoke_model_set,
)

DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
OVERHEAD_TARGET = 0.05


@dataclass(frozen=True)
class PerNfeConfig:
    """Settings of one per-NFE run (defaults: the real run; ``quick()``: a seconds-long smoke run).

    repeats/min_repeats/budget_s: each (backend, batch) row gets ``repeats`` timed calls, fewer (not
    under ``min_repeats``) when one call is so slow that they would take over ``budget_s`` seconds.
    rounds: blocks per row, alternating between backends. threads: torch and ONNX Runtime intra-op
    threads (None: every available core). model: model folder (None: the shipped model), or
    ``tiny_model`` to benchmark tiny random networks (smoke runs only). paper_preset: preset of the
    random-weight UNet (``paper``; ``tiny`` for smoke runs; None to skip it). overhead_*: the
    whole-volume pipeline run (batch None: each backend's best batch from the table).
    """

    model: Path | None = None
    tiny_model: bool = False
    batches: tuple[int, ...] = DEFAULT_BATCHES
    backends: tuple[str, ...] | None = None
    repeats: int = 5  # the committed per_nfe results' setting (make bench reproduces them)
    min_repeats: int = 3
    budget_s: float = 20.0
    rounds: int = 3
    threads: int | None = None
    paper_preset: str | None = "paper"
    peak_size: int = 2048
    peak_repeats: int = 5
    overhead: bool = True
    overhead_sampler: str = "ftddm"
    overhead_ttrunc: int = 100
    overhead_batch: int | None = None
    overhead_maps: int | None = 35  # the first 35 maps of the volume, as the committed results
    phantom_index: int = 0
    phantom_n: int = 16
    engine_dir: Path | None = None
    cache_dir: Path | None = None
    quick_run: bool = False

    @classmethod
    def quick(cls, **changes: Any) -> "PerNfeConfig":
        """A smoke run of a few seconds: tiny presets, two batch sizes, two repeats, four maps."""
        base = cls(batches=(1, 2), repeats=2, min_repeats=1, budget_s=1.0, rounds=2, paper_preset="tiny",
                   peak_size=256, peak_repeats=2, overhead_ttrunc=3, overhead_maps=4, quick_run=True)
        return replace(base, **changes)


def _unet_feeds(batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    from ftddm_trt.export.onnx_export import random_inputs

    feeds = random_inputs("unet", batch, torch.Generator().manual_seed(seed + batch))
    return {k: v.to(device) for k, v in feeds.items()}


def unet_flops_per_image(models: ModelSet) -> int:
    """FLOPs of one UNet forward per image (counted at batch 2 on the CPU)."""
    from ftddm_trt.export.onnx_export import random_inputs

    net = models.load_torch()["unet"].eval()
    return hardware.model_flops(net, random_inputs("unet", 2, torch.Generator().manual_seed(0)))


@dataclass(frozen=True)
class Peaks:
    """Measured ceilings (GFLOP/s) that rows are compared with, by the row's precision and device."""

    cpu_fp32: float
    cpu_bf16: float | None = None
    cuda_fp32: float | None = None
    cuda_fp16: float | None = None

    def for_backend(self, label: str) -> tuple[float | None, str]:
        """(peak GFLOP/s, its name) for backend ``label``."""
        if label.startswith("torch-cuda-fp32"):
            return self.cuda_fp32, "cuda_fp32"
        if "cuda" in label or label.startswith("tensorrt"):
            return self.cuda_fp16, "cuda_fp16"
        return self.cpu_fp32, "cpu_fp32"


def measure_unet(
    backends: dict[str, Backend],
    batches: Sequence[int],
    flops_per_image: int,
    peaks: Peaks,
    cfg: PerNfeConfig,
    model_label: str,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time one UNet call of every backend at every batch size; one result row per (backend, batch)."""
    rows: list[dict[str, Any]] = []
    gflop = flops_per_image / 1e9
    for b in batches:
        fns, reps, devices = {}, {}, {}
        for label, be in backends.items():
            feeds = _unet_feeds(b, be.device)

            def call(be: Backend = be, feeds: dict[str, torch.Tensor] = feeds) -> torch.Tensor:
                return be.unet(**feeds)

            try:
                call()  # warm-up (first-shape allocations, graph capture, ORT arena)
                cuda_sync(be.device)
                t0 = time.perf_counter()
                call()
                cuda_sync(be.device)
                probe = time.perf_counter() - t0
            except Exception as err:  # e.g. out of memory: the row says why
                rows.append(
                    {"model": model_label, "backend": label, "batch": b, "error": f"{type(err).__name__}: {err}"}
                )
                log(f"  {label:>22} b={b:<3} failed: {err}")
                continue
            fns[label] = call
            devices[label] = be.device
            reps[label] = max(cfg.min_repeats, min(cfg.repeats, int(cfg.budget_s / max(probe, 1e-9))))
        timings: dict[str, Timing] = interleaved_times(fns, reps, rounds=cfg.rounds, devices=devices)
        for label, tm in timings.items():
            med = tm.median
            peak, peak_name = peaks.for_backend(label)
            achieved = gflop * b / med
            row = {"model": model_label, "backend": label, "batch": b, **tm.to_dict(),
                   "ms_per_nfe_per_image": med * 1e3 / b, "images_per_s": b / med,
                   "gflop_per_image": gflop, "achieved_gflops": achieved,
                   "peak_gflops": peak, "peak": peak_name, "fraction_of_peak": (achieved / peak) if peak else None}
            if label == "torch-bf16" and peaks.cpu_bf16:
                row["fraction_of_bf16_peak"] = achieved / peaks.cpu_bf16
            rows.append(row)
            log(
                f"  {label:>22} b={b:<3} {med * 1e3:9.2f} ms/call  {med * 1e3 / b:8.2f} ms/NFE/img  "
                f"{achieved:7.1f} GFLOP/s  ({100 * achieved / peak if peak else float('nan'):.0f}% of {peak_name})  "
                f"x{tm.repeats}"
            )
    return rows


def best_batch(rows: Sequence[dict[str, Any]], backend: str, model: str | None = None) -> int | None:
    """The batch size with the lowest ms per NFE per image for ``backend`` (optionally one model)."""
    ok = [
        r
        for r in rows
        if r.get("backend") == backend and "ms_per_nfe_per_image" in r and (model is None or r["model"] == model)
    ]
    return min(ok, key=lambda r: r["ms_per_nfe_per_image"])["batch"] if ok else None


def pipeline_overhead(backend: Backend, spec: SamplerSpec, y: torch.Tensor, s: torch.Tensor, batch_size: int,
                      seed: int = 0) -> dict[str, Any]:
    """Run ``sample_images`` through a ``TimedBackend``; overhead = (wall - network time) / wall."""
    timed = TimedBackend(backend)
    cuda_sync(backend.device)
    t0 = time.perf_counter()
    _x, nfe = sample_images(timed, spec, y, s, batch_size=batch_size, seed=seed)
    cuda_sync(backend.device)
    wall = time.perf_counter() - t0
    net = timed.seconds
    over = (wall - net) / wall if wall > 0 else float("nan")
    return {"sampler": spec.to_dict(), "batch": batch_size, "maps": int(y.shape[0]), "nfe": nfe, "wall_s": wall,
            **timed.summary(), "overhead_s": wall - net, "overhead_fraction": over,
            "ms_per_map": 1e3 * wall / y.shape[0], "meets_target": bool(over < OVERHEAD_TARGET)}


def _open_model(cfg: PerNfeConfig, work: Path, log: Callable[[str], None]) -> tuple[ModelSet | None, str, str | None]:
    """(model set, label, why it is missing)."""
    if cfg.tiny_model:
        log("smoke run: tiny random networks stand in for the shipped model")
        return smoke_model_set(cfg.cache_dir, work, log), "tiny-random (smoke)", None
    try:
        models = ModelSet.open(cfg.model)
    except FileNotFoundError as err:
        return None, str(cfg.model or "shipped"), str(err)
    return models, str(models.root), None


def run_per_nfe(cfg: PerNfeConfig, work_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole per-NFE benchmark; returns the result dict written to per_nfe.json."""
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ftddm-bench-"))
    threads = cfg.threads or hardware.available_cores()
    torch.set_num_threads(threads)
    machine = {**hardware.machine_facts(), "threads_used": threads}
    labels = tuple(cfg.backends) if cfg.backends else default_backends()
    log(f"machine: {machine['cpu_model']}, {machine['available_cores']} cores, load {machine['load_average']}; "
        f"threads {threads}; backends {', '.join(labels)}")

    log(f"matmul peak ({cfg.peak_size}^3, {cfg.peak_repeats} repeats) ...")
    peak = hardware.peak_matmul_gflops(
        threads=threads, size=cfg.peak_size, repeats=cfg.peak_repeats, bf16="torch-bf16" in labels
    )
    peaks = Peaks(cpu_fp32=peak.best_gflops, cpu_bf16=peak.torch_bf16_gflops,
                  cuda_fp32=hardware.cuda_peak_gflops(torch.float32) if torch.cuda.is_available() else None,
                  cuda_fp16=hardware.cuda_peak_gflops(torch.float16) if torch.cuda.is_available() else None)
    log(f"  torch {peak.torch_gflops:.1f}, numpy {peak.numpy_gflops:.1f} GFLOP/s fp32"
        + (f", torch bf16 {peak.torch_bf16_gflops:.1f}" if peak.torch_bf16_gflops else ""))

    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine,
        "peak": {**peak.to_dict(), **{f"peak_{k}": v for k, v in asdict(peaks).items()}},
        "models": {},
        "rows": [],
        "skipped": {},
        "overhead": {},
    }

    models, model_label, missing = _open_model(cfg, work, log)
    if missing:
        result["skipped"]["shipped"] = missing
        log(f"shipped model: skipped ({missing})")
    else:
        assert models is not None
        log(f"model {model_label}: exporting to ONNX (cached) ...")
        onnx_dir = cached_onnx_export(models, cfg.cache_dir, log)
        flops = unet_flops_per_image(models)
        result["models"]["shipped"] = {
            "path": model_label,
            "hashes": models.hashes(),
            "onnx_dir": str(onnx_dir),
            "unet_gflop_per_image": flops / 1e9,
            "unet_config": models.config("unet").get("config"),
        }
        backends, skipped = open_backends(labels, models, onnx_dir, threads, cfg.engine_dir, max(cfg.batches), log)
        result["skipped"].update({f"shipped/{k}": v for k, v in skipped.items()})
        try:
            log(f"shipped UNet ({flops / 1e9:.3f} GFLOP per image per forward):")
            result["rows"] += measure_unet(backends, cfg.batches, flops, peaks, cfg, "shipped", log)
            if cfg.overhead and "flow" in models.networks:
                result["overhead"] = _overheads(cfg, backends, result["rows"], work, log)
            elif cfg.overhead:
                result["skipped"]["overhead"] = "the model set has no flow network"
        finally:
            close_all(backends)

    if cfg.paper_preset:
        log(f"{cfg.paper_preset}-size UNet, random weights:")
        paper = paper_unet(cfg.cache_dir, cfg.paper_preset, log=log)
        flops = unet_flops_per_image(paper.models)
        result["models"]["paper"] = {
            "preset": paper.preset,
            "parameters": paper.parameters,
            "onnx_dir": str(paper.onnx_dir),
            "unet_gflop_per_image": flops / 1e9,
            "ort_vs_torch": paper.check,
        }
        log(f"  {paper.parameters / 1e6:.1f} M parameters, {flops / 1e9:.2f} GFLOP per image per forward; "
            f"max |ORT - torch| on one batch {paper.check['max_abs_error']:.2e}")
        backends, skipped = open_backends(labels, paper.models, paper.onnx_dir, threads, None, max(cfg.batches), log)
        result["skipped"].update({f"paper/{k}": v for k, v in skipped.items()})
        try:
            result["rows"] += measure_unet(backends, cfg.batches, flops, peaks, cfg, "paper", log)
        finally:
            close_all(backends)
    result["load_average_after"] = hardware.load_average()
    return result


def _overheads(cfg: PerNfeConfig, backends: dict[str, Backend], rows: list[dict[str, Any]], work: Path,
               log: Callable[[str], None]) -> dict[str, Any]:
    vol = phantom_condition(work / "phantom", cfg.phantom_index, cfg.phantom_n, max_maps=cfg.overhead_maps)
    spec = SamplerSpec(cfg.overhead_sampler, ttrunc=cfg.overhead_ttrunc)
    log(f"pipeline overhead: {spec.name} ({spec.nfe} NFE) over {vol.y.shape[0]} maps of {vol.subject} "
        f"({vol.slices} slices x {vol.metabolites} metabolites, N={vol.n}):")
    out: dict[str, Any] = {
        "volume": {
            "subject": vol.subject,
            "slices": vol.slices,
            "metabolites": vol.metabolites,
            "n": vol.n,
            "maps": int(vol.y.shape[0]),
        },
        "target": OVERHEAD_TARGET,
        "backends": {},
    }
    for label, be in backends.items():
        b = cfg.overhead_batch or best_batch(rows, label, "shipped") or 16
        try:
            r = pipeline_overhead(be, spec, vol.y, vol.s, b)
        except Exception as err:
            out["backends"][label] = {"error": f"{type(err).__name__}: {err}"}
            log(f"  {label:>22} failed: {err}")
            continue
        out["backends"][label] = r
        log(f"  {label:>22} b={b:<3} wall {r['wall_s']:.2f} s, network {r['network_s']:.2f} s -> overhead "
            f"{100 * r['overhead_fraction']:.1f}% ({'ok' if r['meets_target'] else 'ABOVE TARGET'})")
    return out


def per_nfe_markdown(r: dict[str, Any]) -> str:
    """The readable report of a ``run_per_nfe`` result."""
    cfg = r["config"]
    pk = r["peak"]
    lines = ["# Milliseconds per NFE per image", ""]
    if cfg.get("quick_run"):
        lines += ["**SMOKE RUN (--quick): tiny settings, not a measurement.**", ""]
    lines += [
        "## Machine",
        "",
        *machine_lines(r["machine"], r.get("load_average_after")),
        "",
        f"Measured matmul peak ({pk['size']}x{pk['size']} fp32, median of {pk['repeats']}, {pk['threads']} threads): "
        f"torch **{fmt(pk['torch_gflops'])}** GFLOP/s, numpy **{fmt(pk['numpy_gflops'])}** GFLOP/s"
        + (f", torch bf16 {fmt(pk['torch_bf16_gflops'])} GFLOP/s" if pk.get("torch_bf16_gflops") else "")
        + (
            f"; CUDA fp32 {fmt(pk['peak_cuda_fp32'])}, fp16 {fmt(pk['peak_cuda_fp16'])} GFLOP/s"
            if pk.get("peak_cuda_fp32")
            else ""
        )
        + ". CPU rows are compared with the higher fp32 figure.",
        "",
        NOISE_NOTE,
        "",
    ]
    paper_title = ("Paper-size UNet (random weights)" if cfg.get("paper_preset") == "paper"
                   else f"UNet of preset `{cfg.get('paper_preset')}` (random weights, in place of the paper size)")
    for key, title in (("shipped", "Shipped model UNet"), ("paper", paper_title)):
        info = r["models"].get(key)
        if info is None:
            if key in r["skipped"]:
                lines += [f"## {title}", "", f"Skipped: {r['skipped'][key]}", ""]
            continue
        head = f"## {title}"
        desc = (
            f"`{portable_path(info['path'])}`"
            if key == "shipped"
            else f"preset `{info['preset']}`, {fmt(info['parameters'] / 1e6)} M parameters; max |ORT - torch| on one "
                 "batch "
            f"{info['ort_vs_torch']['max_abs_error']:.1e} (output max {info['ort_vs_torch']['ref_max_abs']:.2g})"
        )
        lines += [head, "", f"{desc}; **{fmt(info['unet_gflop_per_image'])} GFLOP per image per forward** "
                  "(2 x MACs of conv/matmul, FlopCounterMode).", ""]
        rows = [x for x in r["rows"] if x["model"] == key]
        table = []
        for x in rows:
            if "error" in x:
                table.append([x["backend"], x["batch"], "failed", "-", "-", "-", "-", x["error"][:60]])
                continue
            frac = x.get("fraction_of_peak")
            extra = f" ({100 * x['fraction_of_bf16_peak']:.0f}% of bf16)" if x.get("fraction_of_bf16_peak") else ""
            table.append(
                [
                    x["backend"],
                    x["batch"],
                    x["median_ms"],
                    x["ms_per_nfe_per_image"],
                    x["images_per_s"],
                    x["achieved_gflops"],
                    (f"{100 * frac:.1f}%" if frac is not None else "-") + extra,
                    x["repeats"],
                ]
            )
        lines += md_table(["backend", "batch", "ms / call (median)", "ms / NFE / image", "images / s", "GFLOP/s",
                           "of peak", "repeats"], table)
        skipped = {k.split("/", 1)[1]: v for k, v in r["skipped"].items() if k.startswith(f"{key}/")}
        if skipped:
            lines += ["", "Not run: " + "; ".join(f"`{k}`: {v}" for k, v in skipped.items())]
        best = {b: best_batch(rows, b) for b in dict.fromkeys(x["backend"] for x in rows)}
        lines += [
            "",
            "Best batch (lowest ms / NFE / image): " + ", ".join(f"{k} {v}" for k, v in best.items() if v),
            "",
        ]
    ov = r.get("overhead") or {}
    if ov.get("backends"):
        vol = ov["volume"]
        first = (
            next(v for v in ov["backends"].values() if "sampler" in v)
            if any("sampler" in v for v in ov["backends"].values())
            else None
        )
        lines += [
            "## Pipeline overhead over network time",
            "",
            f"`sample_images` over all {vol['maps']} maps of phantom {vol['subject']} ({vol['slices']} slices x "
            f"{vol['metabolites']} metabolites, N = {vol['n']})"
            + (
                f", sampler `{first['sampler']['name']}` (Ttrunc {first['sampler']['ttrunc']}, {first['nfe']} NFE)"
                if first
                else ""
            )
            + ", one run per backend through `TimedBackend`. Network time is the time inside the backend's `unet` and "
            "`flow_reverse` (including its tensor conversions); overhead = (wall - network) / wall, target < "
            f"{100 * ov['target']:.0f}%.",
            "",
        ]
        table = []
        for label, x in ov["backends"].items():
            if "error" in x:
                table.append([label, "-", "-", "-", "-", "failed: " + x["error"][:60]])
                continue
            table.append([label, x["batch"], x["wall_s"], x["network_s"], f"{100 * x['overhead_fraction']:.2f}%",
                          "yes" if x["meets_target"] else "**no**"])
        lines += md_table(["backend", "batch", "wall s", "network s", "overhead", "< 5%"], table) + [""]
    elif "overhead" in r["skipped"]:
        lines += ["## Pipeline overhead", "", f"Skipped: {r['skipped']['overhead']}", ""]
    lines += ["Regenerate with `python benchmarks/per_nfe.py` (see `--help`).", ""]
    return "\n".join(lines)


def load_rows(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a per_nfe.json (for ``latency``'s best batch)."""
    import json

    return list(json.loads(Path(path).read_text()).get("rows", []))


__all__ = ["PerNfeConfig", "Peaks", "measure_unet", "best_batch", "pipeline_overhead", "run_per_nfe",
           "per_nfe_markdown", "unet_flops_per_image", "load_rows", "DEFAULT_BATCHES"]
