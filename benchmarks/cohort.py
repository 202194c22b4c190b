"""Cohort throughput: subjects per minute for 1 and 2 Triton servers, with and without dynamic batching.

    python benchmarks/cohort.py [--model DIR | --onnx DIR] [--subjects 4] [--steps 10] [--clients-per-server 2]

Steps: export the model to ONNX (unless --onnx), write ``--subjects`` phantom subjects, build two cpu
repositories (the network configs with and without ``dynamic_batching``), and for each repository
start two tritonservers on loopback. Then run the cohort path itself (``workflows.cohort.run_cohort``, what
`ftddm-trt upscale-cohort` runs) four ways: 1 server and 2 servers, each with ``--clients-per-server``
concurrent clients per server, on each repository; plus in-process ONNX Runtime as the reference.
Every run's maps are compared with the reference (same seed and batch size). Writes
benchmarks/results/cohort.{json,md}.

On this machine every server and the client share the same 2 CPU cores, so a second server adds no
compute: the numbers measure request overhead and what the dynamic batcher merges, not scale-out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.data.nifti.read import read_map_folder  # noqa: E402
from ftddm_trt.data.nifti.write import write_phantom_subject  # noqa: E402
from ftddm_trt.data.phantom import make_subject  # noqa: E402
from ftddm_trt.serving.launcher import TritonServer  # noqa: E402
from ftddm_trt.serving.repository.build import build_repository  # noqa: E402
from ftddm_trt.serving.repository.render import RepoOptions  # noqa: E402
from ftddm_trt.workflows.cohort import run_cohort  # noqa: E402
from ftddm_trt.workflows.upscale import UpscaleOptions  # noqa: E402


def timed_cohort(data: Path, out: Path, opts: UpscaleOptions) -> dict:
    """One cohort run into a fresh ``out``: wall seconds, subjects per minute, per-subject rows."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rows = run_cohort(data, out, opts)
    wall = time.perf_counter() - t0
    done = [r for r in rows if r.status == "done"]
    return {"wall_s": wall, "subjects": len(done), "failed": len(rows) - len(done),
            "subjects_per_min": 60.0 * len(done) / wall,
            "rows": [{"subject": r.subject, "status": r.status, "seconds": r.seconds, "nfe": r.nfe, "maps": r.maps,
                      "servers": r.servers} for r in rows]}


def max_rel_diff(out: Path, ref: Path, subjects: list[str]) -> float:
    worst = 0.0
    for s in subjects:
        a, _, _ = read_map_folder(out / s)
        b, _, _ = read_map_folder(ref / s)
        worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12)))
    return worst


def markdown(r: dict) -> str:
    lines = [
        "# Cohort throughput over Triton servers",
        "",
        f"Measured by `python benchmarks/cohort.py` in one run on {r['machine']['cpus']} CPU cores "
        f"({r['machine']['platform']}), no GPU. **CPU-bound**: both tritonservers and the client share the same "
        "2 cores (also shared with other work), so a second server adds no compute here; on separate GPU nodes "
        "it would. These rows measure the cost of spreading batches and what Triton's dynamic batcher merges."
        + (f" {r['note']}" if r.get("note") else ""),
        "",
        f"Workload: {r['subjects']} phantom subjects (N = 16, s = 4, metabolites {', '.join(r['metabolites'])}: "
        f"{sum(x['maps'] or 0 for x in r['runs'][0]['rows'])} maps in all), `--sampler ftddm-dpmpp --steps "
        f"{r['steps']}` (NFE {r['nfe']}), `--batch-size {r['batch_size']}`, {r['clients_per_server']} concurrent "
        "clients per server, "
        f"ONNX Runtime with {r['ort_threads']} intra-op thread(s) per server model instance (the in-process row uses "
        f"ONNX Runtime's default, one thread per core). Model: {r['model']}. Dynamic batching waits up to "
        f"{r['queue_delay_us']} us to merge requests.",
        "",
        "| backend | servers | dynamic batching | subjects / min | wall s | max rel. diff vs in-process |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["runs"]:
        lines.append(
            f"| {row['backend']} | {row['servers']} | {row['dynamic_batching']} | {row['subjects_per_min']:.2f} | "
            f"{row['wall_s']:.1f} | {row['max_rel_diff']:.2e} |"
        )
    g = r.get("gain", {})
    lines += ["", "Dynamic batching gain (subjects per minute, with / without): "
              + ", ".join(f"{k} server(s): {v:.2f}x" for k, v in g.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: ftddm_trt/assets/model)")
    ap.add_argument("--onnx", type=Path, default=None, help="existing export folder (skips the export)")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--metabolites", default="NAA,tCho,tCr")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--clients-per-server", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per server model instance")
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="cohort")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the existing .json")
    ap.add_argument("--note", default="", help="a sentence on the conditions of the run (added to the .json and .md)")
    args = ap.parse_args(argv)
    if args.markdown_only:
        result = json.loads((args.out / f"{args.name}.json").read_text())
        if args.note:
            result["note"] = args.note
            (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{args.name}.md").write_text(markdown(result))
        return 0
    work = Path(tempfile.mkdtemp(prefix="ftddm-cohort-bench-"))
    try:
        if args.onnx is None:
            from ftddm_trt.export.onnx_export import export_model_set
            from ftddm_trt.models.model_set import ModelSet

            models = ModelSet.open(args.model)
            onnx_dir = work / "onnx"
            print(f"exporting {models.root} -> {onnx_dir}")
            export_model_set(models, onnx_dir, log=lambda _m: None)
            model_label = "shipped model" if args.model is None else str(models.root)
        else:
            onnx_dir, model_label = args.onnx, str(args.onnx)
        data = work / "data"
        names = [write_phantom_subject(data, make_subject(i, seed=0), 16).name for i in range(args.subjects)]
        metabolites = [m.strip() for m in args.metabolites.split(",")]
        base = dict(
            sampler="ftddm-dpmpp", steps=args.steps, metabolites=metabolites, batch_size=args.batch_size, seed=0
        )
        result: dict = {
            "model": model_label,
            "subjects": args.subjects,
            "steps": args.steps,
            "nfe": args.steps + 1,
            "metabolites": metabolites,
            "batch_size": args.batch_size,
            "clients_per_server": args.clients_per_server,
            "ort_threads": args.threads,
            "queue_delay_us": args.queue_delay_us,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "note": args.note,
            "runs": [],
        }
        ref = work / "ref"
        print("in-process ONNX Runtime ...")
        r = timed_cohort(data, ref, UpscaleOptions(backend="onnxruntime", onnx=onnx_dir, **base))
        result["runs"].append(
            {"backend": "onnxruntime (in-process)", "servers": 0, "dynamic_batching": "-", "max_rel_diff": 0.0, **r}
        )
        for dyn in (True, False):
            repo = work / f"repo-{'dyn' if dyn else 'nodyn'}"
            build_repository(
                onnx_dir,
                repo,
                "cpu",
                options=RepoOptions(
                    max_batch_size=64,
                    max_queue_delay_us=args.queue_delay_us,
                    intra_op_threads=args.threads,
                    dynamic_batching=dyn,
                ),
                log=lambda _m: None,
            )
            servers = [
                TritonServer(repo, startup_timeout_s=600, log_path=work / f"server{k}-{dyn}.log") for k in range(2)
            ]
            try:
                for s in servers:
                    s.start()
                for n in (1, 2):
                    urls = [s.grpc_url for s in servers[:n]]
                    out = work / f"out-{dyn}-{n}"
                    print(f"{n} server(s), dynamic batching {'on' if dyn else 'off'} ...")
                    r = timed_cohort(data, out, UpscaleOptions(backend="triton", url=urls,
                                                               clients_per_server=args.clients_per_server, **base))
                    r.update(backend="triton", servers=n, dynamic_batching="on" if dyn else "off",
                             max_rel_diff=max_rel_diff(out, ref, names))
                    print(f"  {r['subjects_per_min']:.2f} subjects/min, max rel diff {r['max_rel_diff']:.1e}")
                    result["runs"].append(r)
            finally:
                for s in servers:
                    s.stop()
        spm = {(r["servers"], r["dynamic_batching"]): r["subjects_per_min"] for r in result["runs"]}
        result["gain"] = {str(n): spm[(n, "on")] / spm[(n, "off")] for n in (1, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
