"""Load test of the Triton server on loopback: concurrent tritonclient clients calling ftddm_unet.

    python benchmarks/triton_load.py [--model DIR | --onnx DIR] [--concurrency 1,4,16] [--duration 10]

Steps: export the model to ONNX (unless --onnx), generate a cpu repository, start tritonserver
(nvidia-pytriton's bundled binary here; the system one in NVIDIA's container) on free loopback ports,
then for each concurrency level run that many client threads (one gRPC client each) sending
``ftddm_unet`` requests of ``--batch`` images for ``--duration`` seconds (bounded: at most
``--max-requests`` per level). Reports throughput (requests/s, images/s) and p50/p99 latency, and the
Triton round-trip overhead per network evaluation (NFE) against ONNX Runtime in-process on the same
ONNX file: single UNet calls, and a whole sampling loop run three ways (in-process, client loop over
Triton, server loop in ftddm_sampler). Writes benchmarks/results/triton_load.{json,md}.

perf_analyzer is not part of the pip-installable Triton client, hence the Python loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.constants import HR_SIZE, T_TRUNC, TRAINED_LR_SIZES  # noqa: E402
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from ftddm_trt.engine.pipeline import SamplerSpec, sample_images  # noqa: E402
from ftddm_trt.engine.triton_backend import TritonBackend  # noqa: E402
from ftddm_trt.evaluation.report import portable  # noqa: E402
from ftddm_trt.serving.launcher import TritonServer  # noqa: E402
from ftddm_trt.serving.repository.build import build_repository  # noqa: E402
from ftddm_trt.serving.repository.render import RepoOptions  # noqa: E402


def unet_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, 4, HR_SIZE, HR_SIZE, generator=g)
    y[:, 1] = (y[:, 1] > -0.5).float()
    y[:, 2:] = y[:, 2:].abs().clamp(max=1)
    return {"x_t": torch.randn(batch, 1, HR_SIZE, HR_SIZE, generator=g), "y": y,
            "t": torch.randint(1, T_TRUNC + 1, (batch,), generator=g).float(),
            "s": torch.tensor([HR_SIZE / TRAINED_LR_SIZES[i % len(TRAINED_LR_SIZES)] for i in range(batch)],
                              dtype=torch.float32)}


def percentiles(lat_s: list[float]) -> dict[str, float]:
    a = np.asarray(lat_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def load_level(url: str, concurrency: int, batch: int, duration_s: float, max_requests: int) -> dict:
    """``concurrency`` threads, one client each, calling ftddm_unet until the time or request budget ends."""
    feeds = unet_inputs(batch)
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    budget = threading.Semaphore(max_requests)
    start = threading.Barrier(concurrency + 1)
    stop_at = [float("inf")]  # set by the main thread once every client is connected

    def client(k: int) -> None:
        try:
            with TritonBackend(url, timeout_s=120, retries=0, require=("unet",)) as tb:
                tb.unet(**feeds)  # connection warm-up, not timed
                start.wait()
                while time.perf_counter() < stop_at[0] and budget.acquire(blocking=False):
                    t0 = time.perf_counter()
                    tb.unet(**feeds)
                    lat[k].append(time.perf_counter() - t0)
        except Exception as err:  # reported, the level is marked failed
            errors.append(f"client {k}: {err}")
            try:
                start.abort()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    try:
        start.wait(timeout=300)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration_s
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    all_lat = [x for per in lat for x in per]
    n = len(all_lat)
    res = {"concurrency": concurrency, "batch": batch, "requests": n, "wall_s": wall,
           "requests_per_s": n / wall if wall > 0 else 0.0, "images_per_s": n * batch / wall if wall > 0 else 0.0,
           "errors": errors}
    if n:
        res.update(percentiles(all_lat))
    return res


def single_call_latencies(fns: dict, feeds: dict, repeats: int, rounds: int = 3) -> dict:
    """p50/p99 of single calls of each function, in blocks alternating over ``rounds`` rounds so that
    machine-load drift hits all alike (blocks, not single calls: ONNX Runtime's thread pool spins for a
    while after each in-process run and would slow the server calls that follow it)."""
    lat: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(**feeds)
    per_block = max(1, repeats // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            time.sleep(0.05)
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn(**feeds)
                lat[k].append(time.perf_counter() - t0)
    return {k: percentiles(v) for k, v in lat.items()}


def loop_timing(backend, server_backend: TritonBackend | None, spec: SamplerSpec, batch: int) -> dict:
    """Seconds per NFE of one sampling loop (batch images), and the max |difference| to in-process."""
    feeds = unet_inputs(batch, seed=1)
    y, s = feeds["y"], feeds["s"]
    t0 = time.perf_counter()
    ref, nfe = sample_images(backend["ort"], spec, y, s, batch_size=batch, seed=0)
    t_ort = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_c, _ = sample_images(backend["triton"], spec, y, s, batch_size=batch, seed=0)
    t_client = time.perf_counter() - t0
    res = {"sampler": spec.to_dict(), "batch": batch, "nfe": nfe,
           "inprocess_ms_per_nfe": 1e3 * t_ort / nfe, "client_loop_ms_per_nfe": 1e3 * t_client / nfe,
           "client_loop_max_abs_diff": float((out_c - ref).abs().max())}
    if server_backend is not None:
        t0 = time.perf_counter()
        out_s, _ = server_backend.sample_images_on_server(spec, y, s, batch_size=batch, seed=0)
        t_server = time.perf_counter() - t0
        res.update(
            {
                "server_loop_ms_per_nfe": 1e3 * t_server / nfe,
                "server_loop_max_abs_diff": float((out_s - ref).abs().max()),
            }
        )
    return res


def markdown(r: dict) -> str:
    lines = [
        "# Triton load test (loopback, cpu repository)",
        "",
        f"{r['machine']['cpus']} CPU cores, {r['machine']['platform']}; tritonserver {r['server']['version']} "
        f"({'bundled in nvidia-pytriton' if r['server']['bundled'] else r['server']['binary']}); model `{r['model']}`; "
        f"{r['duration_s']} s per level (at most {r['max_requests']} requests); ONNX Runtime with {r['ort_threads']} "
        "intra-op threads in-process and in each server model.",
        "",
        f"Server start until every model is ready: {r['server']['start_s']:.1f} s; "
        f"stop: {r['server']['stop_s']:.1f} s.",
        "",
        "## ftddm_unet under concurrent clients",
        "",
        "| clients | batch | requests | req/s | images/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in r["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['batch']} | {lv['requests']} | {lv['requests_per_s']:.1f} | "
            f"{lv['images_per_s']:.1f} | {lv.get('p50_ms', float('nan')):.2f} | {lv.get('p99_ms', float('nan')):.2f} | "
            f"{len(lv['errors'])} |"
        )
    o = r["overhead"]
    lines += ["", "## Round-trip overhead per NFE (one client, same ONNX file)", "",
              "| path | p50 ms per UNet call |", "|---|---|",
              f"| ONNX Runtime in-process | {o['inprocess']['p50_ms']:.2f} |",
              f"| Triton gRPC | {o['triton_grpc']['p50_ms']:.2f} |",
              f"| Triton gRPC + system shared memory | {o['triton_grpc_shm']['p50_ms']:.2f} |",
              f"| Triton HTTP | {o['triton_http']['p50_ms']:.2f} |", "",
              f"Triton gRPC overhead per NFE: **{o['grpc_overhead_ms_per_nfe']:.2f} ms** (p50 difference).", ""]
    lp = r["loop"]
    lines += [
        "## One sampling loop",
        "",
        f"`{lp['sampler']['name']}`, {lp['nfe']} NFE, batch {lp['batch']}:",
        "",
        "| path | ms per NFE | max abs diff vs in-process |",
        "|---|---|---|",
        f"| in-process ONNX Runtime | {lp['inprocess_ms_per_nfe']:.2f} | 0 |",
        f"| client loop over Triton | {lp['client_loop_ms_per_nfe']:.2f} | {lp['client_loop_max_abs_diff']:.2g} |",
    ]
    if "server_loop_ms_per_nfe" in lp:
        lines.append(
            f"| server loop (ftddm_sampler, BLS) | {lp['server_loop_ms_per_nfe']:.2f} | "
            f"{lp['server_loop_max_abs_diff']:.2g} |"
        )
    lines += ["", "Machine shared with other jobs: numbers are indicative. Regenerate with "
              "`python benchmarks/triton_load.py`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: ftddm_trt/assets/model)")
    ap.add_argument("--onnx", type=Path, default=None, help="existing export folder (skips the export)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--batch", type=int, default=1, help="images per ftddm_unet request")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per concurrency level")
    ap.add_argument("--max-requests", type=int, default=20000, help="request budget per level")
    ap.add_argument("--repeats", type=int, default=50, help="single-call latency samples")
    ap.add_argument("--loop-steps", type=int, default=10, help="ftddm-dpmpp steps of the sampling-loop comparison")
    ap.add_argument("--queue-delay-us", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime intra-op threads, in-process and in each server model alike")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="triton_load", help="result file stem")
    ap.add_argument("--keep", action="store_true", help="keep the temporary export and repository")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    work = Path(tempfile.mkdtemp(prefix="ftddm-triton-load-"))
    if args.onnx is None:
        from ftddm_trt.export.onnx_export import export_model_set
        from ftddm_trt.models.model_set import ModelSet

        try:
            models = ModelSet.open(args.model)
        except FileNotFoundError as err:
            print(f"error: {err}; pass --model DIR (a model folder) or --onnx DIR (an export)", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
            return 2
        onnx_dir = work / "onnx"
        print(f"exporting {models.root} -> {onnx_dir}")
        export_model_set(models, onnx_dir, log=lambda _m: None)
        model_label = str(models.root)
    else:
        onnx_dir = args.onnx
        model_label = str(onnx_dir)
    repo = work / "repo"
    max_batch = max(16, args.batch * max(levels))
    build_repository(
        onnx_dir,
        repo,
        "cpu",
        options=RepoOptions(
            max_batch_size=min(max_batch, 128), max_queue_delay_us=args.queue_delay_us, intra_op_threads=args.threads
        ),
        log=lambda _m: None,
    )
    server = TritonServer(repo, startup_timeout_s=600)
    print("starting tritonserver ...")
    server.start()
    print(f"ready in {server.start_time_s:.1f} s (gRPC {server.grpc_url})")
    result: dict = {
        "model": model_label,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "ort_threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server": {
            "binary": str(server.install.binary),
            "bundled": server.install.bundled,
            "start_s": server.start_time_s,
        },
    }
    try:
        with TritonBackend(server.grpc_url) as tb:
            result["server"]["version"] = tb.server_version
        for c in levels:
            lv = load_level(server.grpc_url, c, args.batch, args.duration, args.max_requests)
            print(f"clients {c:>3}: {lv['requests_per_s']:.1f} req/s, p50 {lv.get('p50_ms', float('nan')):.2f} ms, "
                  f"p99 {lv.get('p99_ms', float('nan')):.2f} ms, errors {len(lv['errors'])}")
            result["levels"] = [*result.get("levels", []), lv]
        feeds = unet_inputs(args.batch)
        ort = OnnxRuntimeBackend(onnx_dir, threads=args.threads)
        clients = {
            "triton_grpc": TritonBackend(server.grpc_url),
            "triton_grpc_shm": TritonBackend(server.grpc_url, shared_memory=True),
            "triton_http": TritonBackend(server.http_url, protocol="http"),
        }
        try:
            overhead = single_call_latencies(
                {"inprocess": ort.unet, **{k: c.unet for k, c in clients.items()}}, feeds, args.repeats
            )
        finally:
            for c in clients.values():
                c.close()
        overhead["grpc_overhead_ms_per_nfe"] = overhead["triton_grpc"]["p50_ms"] - overhead["inprocess"]["p50_ms"]
        result["overhead"] = overhead
        print(
            f"in-process p50 {overhead['inprocess']['p50_ms']:.2f} ms, Triton gRPC p50 "
            f"{overhead['triton_grpc']['p50_ms']:.2f} ms "
            f"-> {overhead['grpc_overhead_ms_per_nfe']:.2f} ms per NFE"
        )
        spec = SamplerSpec("ftddm-dpmpp", steps=args.loop_steps)
        with TritonBackend(server.grpc_url) as tb:
            result["loop"] = loop_timing({"ort": ort, "triton": tb}, tb, spec, batch=max(1, args.batch))
        ort.close()
    finally:
        t0 = time.perf_counter()
        server.stop()
        result["server"]["stop_s"] = time.perf_counter() - t0
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = portable(result)  # no absolute paths of this machine in the results
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(f"wrote {args.out / (args.name + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
