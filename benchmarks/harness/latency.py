"""Per-map latency of the whole FTDDM sampler across runtimes.

Samplers: ``ftddm`` (Ttrunc = 100: flow + 100 ancestral steps, 101 NFE) and ``ftddm-dpmpp`` (20
DPM-Solver++ steps, 21 NFE). Backends (labels):

- ``torch-fp32``, ``torch-bf16``, ``onnxruntime``: in-process ``pipeline.sample_images``;
- ``triton-client``: ``sample_images`` over ``TritonBackend`` (one gRPC request per NFE) to a
  ``tritonserver`` this benchmark starts itself (``serving.launcher.TritonServer``, free loopback ports)
  on a ``cpu`` repository generated from the same ONNX export (``serving.repository.build_repository``);
- ``triton-server``: the whole loop inside the server (``ftddm_sampler`` over BLS), one request per
  batch (``TritonBackend.sample_images_on_server``);
- with CUDA: ``torch-cuda-fp16-graph`` and ``tensorrt-fp16``.

Each (sampler, backend, batch) cell runs one batch of maps from a phantom volume ``repeats`` times
(blocks alternating between backends); latency per map = wall / batch. Batch 1 is the latency of a
single map; the best batch (lowest ms/NFE/image in ``per_nfe.json``, else 16) is the amortised cost
in whole-volume batching. Outputs are compared with ONNX Runtime's for the same seed and batch.
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
from ftddm_trt.evaluation.report import md_table
from ftddm_trt.models.model_set import ModelSet

from . import hardware
from .hardware import machine_lines
from .timing import NOISE_NOTE, interleaved_times
from .workloads import (
    cached_onnx_export,
    close_all,
    open_backends,
    phantom_condition,
    smoke_model_set,
)

TRITON_LABELS: tuple[str, ...] = ("triton-client", "triton-server")
DEFAULT_BACKENDS: tuple[str, ...] = ("torch-fp32", "torch-bf16", "onnxruntime", *TRITON_LABELS)
GPU_EXTRA: tuple[str, ...] = ("torch-cuda-fp16-graph", "tensorrt-fp16")
DEFAULT_SAMPLERS: tuple[SamplerSpec, ...] = (SamplerSpec("ftddm", ttrunc=100), SamplerSpec("ftddm-dpmpp", steps=20))
FALLBACK_BEST_BATCH = 16
#: Which per_nfe row gives a latency backend its best batch (Triton's cpu repository runs ONNX Runtime).
PER_NFE_SOURCE = {"triton-client": "onnxruntime", "triton-server": "onnxruntime"}
WARMUP_SPEC = SamplerSpec("ftddm-dpmpp", steps=1)


@dataclass(frozen=True)
class LatencyConfig:
    """Settings of one latency run (defaults: the real run; ``quick()``: a smoke run).

    best_batch: the second batch size of every backend (None: from ``per_nfe_json``, per backend).
    repeats: timed runs per cell. triton: start a server for the Triton rows (False: skip them).
    """

    model: Path | None = None
    tiny_model: bool = False
    backends: tuple[str, ...] | None = None
    samplers: tuple[SamplerSpec, ...] = DEFAULT_SAMPLERS
    best_batch: int | None = None
    per_nfe_json: Path | None = None
    repeats: int = 3
    rounds: int = 3
    threads: int | None = None
    triton: bool = True
    triton_startup_s: float = 600.0
    phantom_index: int = 0
    phantom_n: int = 16
    engine_dir: Path | None = None
    cache_dir: Path | None = None
    quick_run: bool = False

    @classmethod
    def quick(cls, **changes: Any) -> "LatencyConfig":
        """Smoke run: short samplers (3 steps), best batch 2, one repeat."""
        base = cls(samplers=(SamplerSpec("ftddm", ttrunc=3), SamplerSpec("ftddm-dpmpp", steps=2)), best_batch=2,
                   repeats=1, rounds=1, quick_run=True)
        return replace(base, **changes)


def default_backends() -> tuple[str, ...]:
    return DEFAULT_BACKENDS + (GPU_EXTRA if torch.cuda.is_available() else ())


def best_batches(labels: Sequence[str], per_nfe_json: Path | None, fixed: int | None,
                 model_hashes: dict[str, str] | None = None) -> tuple[dict[str, int], str]:
    """Best batch per backend label and where it came from (a warning when per_nfe.json was measured
    on other weights than ``model_hashes``)."""
    if fixed is not None:
        return {k: fixed for k in labels}, "given"
    if per_nfe_json is not None and Path(per_nfe_json).is_file():
        import json

        from .per_nfe import best_batch

        data = json.loads(Path(per_nfe_json).read_text())
        rows = data.get("rows", [])
        out = {}
        for k in labels:
            out[k] = (
                best_batch(rows, PER_NFE_SOURCE.get(k, k), "shipped")
                or best_batch(rows, "onnxruntime", "shipped")
                or FALLBACK_BEST_BATCH
            )
        measured_on = data.get("models", {}).get("shipped", {}).get("hashes")
        warn = "" if model_hashes is None or measured_on == model_hashes else "; WARNING: measured on other weights"
        return out, f"per_nfe ({per_nfe_json}{warn})"
    return {k: FALLBACK_BEST_BATCH for k in labels}, f"fallback {FALLBACK_BEST_BATCH} (no per_nfe.json)"


class _Runner:
    """One backend's way of sampling a batch; keeps the last output for the agreement check."""

    def __init__(
        self,
        label: str,
        fn: Callable[[SamplerSpec, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, int]],
        device: torch.device,
    ) -> None:
        self.label = label
        self.fn = fn
        self.device = device
        self.last: torch.Tensor | None = None

    def __call__(self, spec: SamplerSpec, y: torch.Tensor, s: torch.Tensor, batch: int) -> torch.Tensor:
        x, _nfe = self.fn(spec, y, s, batch)
        self.last = x
        return x


def _in_process(backend: Backend) -> Callable[[SamplerSpec, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, int]]:
    def run(spec: SamplerSpec, y: torch.Tensor, s: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
        return sample_images(backend, spec, y, s, batch_size=batch, seed=0)

    return run


def _on_server(backend: Any) -> Callable[[SamplerSpec, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, int]]:
    def run(spec: SamplerSpec, y: torch.Tensor, s: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
        return backend.sample_images_on_server(spec, y, s, batch_size=batch, seed=0)

    return run


@dataclass
class TritonSession:
    """A started server and its client (``None`` fields with ``reason`` when Triton could not run)."""

    server: Any = None
    client: Any = None
    reason: str | None = None
    info: dict[str, Any] | None = None

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        if self.server is not None:
            t0 = time.perf_counter()
            self.server.stop()
            if self.info is not None:
                self.info["stop_s"] = time.perf_counter() - t0


def start_triton(onnx_dir: Path, work: Path, max_batch: int, threads: int, startup_s: float,
                 log: Callable[[str], None] = print) -> TritonSession:
    """Generate a cpu repository from ``onnx_dir`` and start tritonserver on free ports; failures become
    a ``reason`` (the Triton rows are then skipped, not the benchmark)."""
    try:
        from ftddm_trt.engine.triton_backend import TritonBackend
        from ftddm_trt.serving.launcher import TritonServer
        from ftddm_trt.serving.repository import RepoOptions, build_repository
    except ImportError as err:
        return TritonSession(reason=f"Triton client/launcher not importable: {err}")
    repo = work / "triton-repo"
    try:
        build_repository(
            onnx_dir,
            repo,
            "cpu",
            options=RepoOptions(max_batch_size=min(max(max_batch, 1), 128), intra_op_threads=threads),
            force=True,
            log=lambda _m: None,
        )
        server = TritonServer(repo, startup_timeout_s=startup_s)
    except Exception as err:
        return TritonSession(reason=f"{type(err).__name__}: {err}")
    log(f"starting tritonserver ({server.install.binary}) on {server.grpc_url} ...")
    try:
        server.start()
    except Exception as err:
        return TritonSession(reason=f"tritonserver did not start: {type(err).__name__}: {str(err)[:500]}")
    try:
        client = TritonBackend(server.grpc_url, timeout_s=600)
    except Exception as err:
        server.stop()
        return TritonSession(reason=f"client could not connect: {type(err).__name__}: {err}")
    info = {
        "binary": str(server.install.binary),
        "bundled": server.install.bundled,
        "version": client.server_version,
        "start_s": server.start_time_s,
        "grpc_url": server.grpc_url,
        "repository": "cpu flavour (Python backend + ONNX Runtime)",
        "max_batch_size": min(max(max_batch, 1), 128),
        "intra_op_threads": threads,
    }
    log(f"  ready in {server.start_time_s:.1f} s (Triton {client.server_version})")
    return TritonSession(server=server, client=client, info=info)


def _open_model(cfg: LatencyConfig, work: Path, log: Callable[[str], None]) -> tuple[ModelSet, str]:
    if cfg.tiny_model:
        log("smoke run: tiny random networks stand in for the shipped model")
        return smoke_model_set(cfg.cache_dir, work, log), "tiny-random (smoke)"
    models = ModelSet.open(cfg.model)
    return models, str(models.root)


def run_latency(cfg: LatencyConfig, work_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole latency benchmark; returns the result dict written to latency.json."""
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ftddm-latency-"))
    threads = cfg.threads or hardware.available_cores()
    torch.set_num_threads(threads)
    machine = {**hardware.machine_facts(), "threads_used": threads}
    labels = tuple(cfg.backends) if cfg.backends else default_backends()
    models, model_label = _open_model(cfg, work, log)
    onnx_dir = cached_onnx_export(models, cfg.cache_dir, log)
    best, best_source = best_batches(labels, cfg.per_nfe_json, cfg.best_batch, models.hashes())
    batches = {k: sorted({1, best[k]}) for k in labels}
    need = max(max(v) for v in batches.values())
    vol = phantom_condition(work / "phantom", cfg.phantom_index, cfg.phantom_n)
    if vol.y.shape[0] < need:
        raise ValueError(f"the phantom volume has {vol.y.shape[0]} maps, fewer than the batch {need}")
    log(f"model {model_label}; backends {', '.join(labels)}; batches {batches} ({best_source}); "
        f"{cfg.repeats} repeats; volume {vol.subject} ({vol.y.shape[0]} maps)")
    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": machine,
        "model": {"path": model_label, "hashes": models.hashes(), "onnx_dir": str(onnx_dir)},
        "best_batch": best,
        "best_batch_source": best_source,
        "rows": [],
        "skipped": {},
        "triton": None,
    }
    result["config"]["samplers"] = [sp.to_dict() for sp in cfg.samplers]
    local = [k for k in labels if k not in TRITON_LABELS]
    backends, skipped = open_backends(local, models, onnx_dir, threads, cfg.engine_dir, max(best.values()), log)
    result["skipped"].update(skipped)
    runners: dict[str, _Runner] = {k: _Runner(k, _in_process(b), b.device) for k, b in backends.items()}
    triton = TritonSession(reason="not asked for")
    want_triton = [k for k in labels if k in TRITON_LABELS]
    if want_triton and cfg.triton:
        triton = start_triton(onnx_dir, work, max(best[k] for k in want_triton), threads, cfg.triton_startup_s, log)
    if triton.client is not None:
        result["triton"] = triton.info
        if "triton-client" in want_triton:
            runners["triton-client"] = _Runner("triton-client", _in_process(triton.client), torch.device("cpu"))
        if "triton-server" in want_triton:
            runners["triton-server"] = _Runner("triton-server", _on_server(triton.client), torch.device("cpu"))
    else:
        for k in want_triton:
            result["skipped"][k] = triton.reason if cfg.triton else "Triton rows switched off (--no-triton)"
    for k, why in result["skipped"].items():
        log(f"  {k}: skipped ({why})")
    try:
        result["rows"] = measure_cells(runners, cfg, batches, vol.y, vol.s, log)
    finally:
        close_all(backends)
        triton.close()
    result["load_average_after"] = hardware.load_average()
    return result


def measure_cells(runners: dict[str, _Runner], cfg: LatencyConfig, batches: dict[str, list[int]], y: torch.Tensor,
                  s: torch.Tensor, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every (sampler, batch, backend) cell, backends interleaved; one row per cell."""
    rows: list[dict[str, Any]] = []
    all_batches = sorted({b for v in batches.values() for b in v})
    for spec in cfg.samplers:
        for b in all_batches:
            yb, sb = y[:b].contiguous(), s[:b].contiguous()
            fns, devices, errors = {}, {}, {}
            for label, run in runners.items():
                if b not in batches.get(label, []):
                    continue
                try:
                    run(WARMUP_SPEC, yb, sb, b)  # shapes, sessions, connections; not timed
                except Exception as err:
                    errors[label] = f"{type(err).__name__}: {str(err)[:300]}"
                    continue

                def call(run: _Runner = run) -> torch.Tensor:
                    return run(spec, yb, sb, b)

                fns[label] = call
                devices[label] = run.device
            timings = interleaved_times(fns, cfg.repeats, rounds=cfg.rounds, devices=devices, errors=errors)
            ref = runners["onnxruntime"].last if "onnxruntime" in timings else None
            for label, tm in timings.items():
                out = runners[label].last
                diff = (
                    float((out.float().cpu() - ref).abs().max())
                    if ref is not None and out is not None and out.shape == ref.shape
                    else None
                )
                rows.append(
                    {
                        "sampler": spec.name,
                        "spec": spec.to_dict(),
                        "nfe": spec.nfe,
                        "backend": label,
                        "batch": b,
                        **tm.to_dict(1.0, "s"),
                        "ms_per_map": 1e3 * tm.median / b,
                        "ms_per_map_per_nfe": 1e3 * tm.median / b / spec.nfe,
                        "batch_latency_ms": 1e3 * tm.median,
                        "max_abs_diff_vs_onnxruntime": diff,
                    }
                )
                log(
                    f"  {spec.name:>12} ({spec.nfe:>3} NFE) {label:>22} b={b:<3} {1e3 * tm.median / b:10.1f} ms/map  "
                    f"(batch {1e3 * tm.median:.0f} ms, x{tm.repeats})"
                    + (f"  |diff vs ORT| {diff:.1e}" if diff is not None else "")
                )
            for label, err in errors.items():
                rows.append(
                    {
                        "sampler": spec.name,
                        "spec": spec.to_dict(),
                        "nfe": spec.nfe,
                        "backend": label,
                        "batch": b,
                        "error": err,
                    }
                )
                log(f"  {spec.name:>12} {label:>22} b={b:<3} failed: {err}")
    return rows


def latency_markdown(r: dict[str, Any], chart: str | None = "latency.png") -> str:
    """The readable report of a ``run_latency`` result."""
    lines = ["# Per-map latency of the FTDDM sampler", ""]
    if r["config"].get("quick_run"):
        lines += ["**SMOKE RUN (--quick): tiny settings, not a measurement.**", ""]
    lines += ["## Machine", "", *machine_lines(r["machine"], r.get("load_average_after")), ""]
    tri = r.get("triton")
    if tri:
        lines += [
            f"Triton {tri['version']} ({'nvidia-pytriton bundled binary' if tri['bundled'] else tri['binary']}), "
            f"{tri['repository']}, max batch {tri['max_batch_size']}, ONNX Runtime {tri['intra_op_threads']} threads "
            f"per model; started by the benchmark on loopback in {tri['start_s']:.1f} s.",
            "",
        ]
    lines += [
        f"Model `{r['model']['path']}`. Best batch per backend ({r['best_batch_source']}): "
        + ", ".join(f"{k} {v}" for k, v in r["best_batch"].items())
        + ".",
        "",
        "Each cell samples one batch of maps of a phantom volume (seed 0) `repeats` times; ms / map = median wall "
        "time / batch (batch 1: the latency of one map; best batch: the amortised cost in whole-volume batching). "
        "Last column: max |x0 - x0(ONNX Runtime)| for the same seed and batch (float32 round-off, amplified by "
        "the sampler's steps).",
        "",
        NOISE_NOTE,
        "",
    ]
    for sampler in dict.fromkeys(x["sampler"] for x in r["rows"]):
        rows = [x for x in r["rows"] if x["sampler"] == sampler]
        spec = rows[0]["spec"]
        lines += [
            f"## `{sampler}` ({spec['nfe']} NFE"
            + (f", Ttrunc {spec['ttrunc']}" if sampler == "ftddm" else f", {spec['steps']} steps")
            + ")",
            "",
        ]
        table = []
        for x in rows:
            if "error" in x:
                table.append([x["backend"], x["batch"], "failed", "-", "-", "-", x["error"][:80]])
            else:
                table.append([x["backend"], x["batch"], x["ms_per_map"], x["batch_latency_ms"], x["ms_per_map_per_nfe"],
                              x["repeats"], x["max_abs_diff_vs_onnxruntime"]])
        lines += md_table(
            ["backend", "batch", "ms / map (median)", "ms / batch", "ms / map / NFE", "repeats", "max diff vs ORT"],
            table,
        )
        lines += [""]
    if r["skipped"]:
        lines += ["## Not run", ""] + [f"- `{k}`: {v}" for k, v in r["skipped"].items()] + [""]
    if chart:
        lines += [f"![latency per map]({chart})", ""]
    lines += ["Regenerate with `python benchmarks/latency.py` (see `--help`).", ""]
    return "\n".join(lines)


def latency_chart(r: dict[str, Any], path: Path | str) -> Path:
    """Bar chart (log scale) of ms per map: one panel per sampler, backends on x, batch 1 vs best batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    samplers = list(dict.fromkeys(x["sampler"] for x in r["rows"]))
    fig, axes = plt.subplots(1, max(1, len(samplers)), figsize=(6.5 * max(1, len(samplers)), 4.8), squeeze=False)
    for ax, sampler in zip(axes[0], samplers):
        rows = [x for x in r["rows"] if x["sampler"] == sampler and "error" not in x]
        labels = list(dict.fromkeys(x["backend"] for x in rows))
        width = 0.38
        for k, (kind, color) in enumerate((("batch 1", "#4C72B0"), ("best batch", "#DD8452"))):
            xs, hs, lo, hi, tags = [], [], [], [], []
            for i, label in enumerate(labels):
                cells = sorted((x for x in rows if x["backend"] == label), key=lambda x: x["batch"])
                cell = (
                    cells[0]
                    if kind == "batch 1"
                    else (cells[-1] if len(cells) > 1 and cells[-1]["batch"] > 1 else None)
                )
                if cell is None or (kind == "batch 1" and cell["batch"] != 1):
                    continue
                b = cell["batch"]
                xs.append(i + (k - 0.5) * width)
                hs.append(cell["ms_per_map"])
                lo.append(cell["ms_per_map"] - 1e3 * cell["min_s"] / b)
                hi.append(1e3 * cell["max_s"] / b - cell["ms_per_map"])
                tags.append(f"{cell['ms_per_map']:.0f}" + ("" if kind == "batch 1" else f"\nb={b}"))
            bars = ax.bar(xs, hs, width, yerr=[lo, hi], capsize=3, color=color, label=kind)
            for bar, tag in zip(bars, tags):
                ax.annotate(tag, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 3), textcoords="offset points")
        spec = rows[0]["spec"] if rows else {"nfe": "?"}
        ax.set_title(f"{sampler} ({spec['nfe']} NFE)")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        heights = [x["ms_per_map"] for x in rows]
        if heights:
            ax.set_ylim(min(heights) * 0.6, max(heights) * 2.2)  # room for the value labels
        ax.set_ylabel("ms per map (median; bars: min-max)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cpu = r["machine"].get("cpu_model", "")
    title = f"FTDDM per-map latency - {cpu}, {r['machine'].get('threads_used')} threads"
    if r["config"].get("quick_run"):
        title = "SMOKE RUN (not a measurement) - " + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["LatencyConfig", "run_latency", "measure_cells", "start_triton", "best_batches", "latency_markdown",
           "latency_chart", "DEFAULT_BACKENDS", "DEFAULT_SAMPLERS"]
