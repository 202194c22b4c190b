"""Milliseconds per NFE per image across backends and batch sizes, against the measured matmul peak,
and the sampling pipeline's overhead over pure network time on a whole phantom volume.

    python benchmarks/per_nfe.py [--model DIR] [--out benchmarks/results]
    python benchmarks/per_nfe.py --quick --out /tmp/bench-smoke      # seconds-long smoke run

Writes OUT/per_nfe.json (every sample) and OUT/per_nfe.md (the tables). See benchmarks/harness/per_nfe.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness.per_nfe import DEFAULT_BATCHES, PerNfeConfig, per_nfe_markdown, run_per_nfe  # noqa: E402
from ftddm_trt.evaluation.report import portable, write_json  # noqa: E402
from ftddm_trt.models.model_set import SHIPPED_MODEL_DIR  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: ftddm_trt/assets/model)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where per_nfe.{json,md} go")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run in seconds: tiny presets, batches 1,2, 2 repeats; without --model and without a "
                         "shipped model, tiny random networks stand in")
    ap.add_argument(
        "--batches", type=_ints, default=None, help=f"comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})"
    )
    ap.add_argument("--backends", default=None,
                    help="comma-separated labels (default: torch-fp32,torch-bf16,onnxruntime, + GPU ones with CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per row before repeats are cut (default 20)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all available cores)")
    ap.add_argument("--paper-preset", default=None, choices=["paper", "cpu", "tiny", "none"],
                    help="preset of the random-weight UNet (default paper; none skips it)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the whole-volume pipeline overhead run")
    ap.add_argument(
        "--overhead-batch", type=int, default=None, help="batch of the overhead run (default: best per backend)"
    )
    ap.add_argument("--overhead-maps", type=int, default=None, help="maps of the volume used (default 35; 0: all)")
    ap.add_argument("--engines", type=Path, default=None, help="TensorRT engine folder of the model (GPU only)")
    ap.add_argument(
        "--cache", type=Path, default=None, help="export cache (default $FTDDM_TRT_CACHE or ~/.cache/ftddm-trt)"
    )
    args = ap.parse_args(argv)

    cfg = PerNfeConfig.quick() if args.quick else PerNfeConfig()
    changes: dict = {"model": args.model, "engine_dir": args.engines, "overhead": not args.no_overhead}
    if args.quick and args.model is None and not (SHIPPED_MODEL_DIR / "unet.safetensors").is_file():
        changes["tiny_model"] = True
    for name, value in (("batches", args.batches), ("repeats", args.repeats), ("budget_s", args.budget),
                        ("threads", args.threads), ("overhead_batch", args.overhead_batch),
                        ("overhead_maps", args.overhead_maps)):
        if value is not None:
            changes[name] = value
    if args.overhead_maps == 0:
        changes["overhead_maps"] = None  # the whole volume
    if args.backends:
        changes["backends"] = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.paper_preset is not None:
        changes["paper_preset"] = None if args.paper_preset == "none" else args.paper_preset
    if args.cache is not None:
        changes["cache_dir"] = args.cache
    elif args.quick:
        changes["cache_dir"] = Path(tempfile.gettempdir()) / "ftddm-bench-cache"  # keep smoke exports out of ~/.cache
    cfg = replace(cfg, **changes)
    if args.quick and args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        print(
            "error: --quick results are not measurements; pass --out elsewhere (e.g. /tmp/bench-smoke)", file=sys.stderr
        )
        return 2
    result = portable(run_per_nfe(cfg))  # no absolute paths of this machine in the results
    j = write_json(args.out / "per_nfe.json", result)
    (args.out / "per_nfe.md").write_text(per_nfe_markdown(result))
    print(f"wrote {j} and {args.out / 'per_nfe.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
