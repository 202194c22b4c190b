"""Per-map latency of the full FTDDM sampler (ftddm Ttrunc=100, ftddm-dpmpp 20 steps) across torch,
ONNX Runtime, Triton client loop and Triton server loop, at batch 1 and at the best batch size.

    python benchmarks/latency.py [--model DIR] [--out benchmarks/results]
    python benchmarks/latency.py --quick --out /tmp/bench-smoke      # smoke run

The best batch per backend comes from OUT/per_nfe.json (run benchmarks/per_nfe.py first) unless
--best-batch is given. The Triton rows start their own tritonserver on free loopback ports.
Writes OUT/latency.json, OUT/latency.md and OUT/latency.png. See benchmarks/harness/latency.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness.latency import LatencyConfig, latency_chart, latency_markdown, run_latency  # noqa: E402
from ftddm_trt.evaluation.report import portable, write_json  # noqa: E402
from ftddm_trt.models.model_set import SHIPPED_MODEL_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: ftddm_trt/assets/model)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where latency.{json,md,png} go")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3-step samplers, batches 1 and 2, one repeat; without --model and without a "
                         "shipped model, tiny random networks stand in")
    ap.add_argument("--backends", default=None,
                    help="comma-separated labels (default torch-fp32,torch-bf16,onnxruntime,triton-client,triton-server"
                         " + torch-cuda-fp16-graph,tensorrt-fp16 with CUDA)")
    ap.add_argument(
        "--best-batch", type=int, default=None, help="second batch size for every backend (default: from per_nfe.json)"
    )
    ap.add_argument(
        "--per-nfe", type=Path, default=None, help="per_nfe.json to take best batches from (default OUT/per_nfe.json)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 3)")
    ap.add_argument("--ttrunc", type=int, default=None, help="Ttrunc of the ftddm sampler (default 100)")
    ap.add_argument("--steps", type=int, default=None, help="steps of ftddm-dpmpp (default 20)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads, in-process and per Triton model (default: all cores)",
    )
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton rows")
    ap.add_argument("--engines", type=Path, default=None, help="TensorRT engine folder of the model (GPU only)")
    ap.add_argument(
        "--cache", type=Path, default=None, help="export cache (default $FTDDM_TRT_CACHE or ~/.cache/ftddm-trt)"
    )
    args = ap.parse_args(argv)

    cfg = LatencyConfig.quick() if args.quick else LatencyConfig()
    changes: dict = {"model": args.model, "engine_dir": args.engines, "triton": not args.no_triton,
                     "per_nfe_json": args.per_nfe or (args.out / "per_nfe.json")}
    if args.quick and args.model is None and not (SHIPPED_MODEL_DIR / "unet.safetensors").is_file():
        changes["tiny_model"] = True
    for name, value in (("best_batch", args.best_batch), ("repeats", args.repeats), ("threads", args.threads)):
        if value is not None:
            changes[name] = value
    if args.ttrunc is not None or args.steps is not None:
        ft, dp = cfg.samplers
        changes["samplers"] = (replace(ft, ttrunc=args.ttrunc or ft.ttrunc), replace(dp, steps=args.steps or dp.steps))
    if args.backends:
        changes["backends"] = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.cache is not None:
        changes["cache_dir"] = args.cache
    elif args.quick:
        changes["cache_dir"] = Path(tempfile.gettempdir()) / "ftddm-bench-cache"
    cfg = replace(cfg, **changes)
    if args.quick and args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        print(
            "error: --quick results are not measurements; pass --out elsewhere (e.g. /tmp/bench-smoke)", file=sys.stderr
        )
        return 2
    result = portable(run_latency(cfg))  # no absolute paths of this machine in the results
    j = write_json(args.out / "latency.json", result)
    png = latency_chart(result, args.out / "latency.png")
    (args.out / "latency.md").write_text(latency_markdown(result, png.name))
    print(f"wrote {j}, {args.out / 'latency.md'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
