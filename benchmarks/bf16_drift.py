"""Quality drift of bf16 autocast (PyTorch backend, CPU) against fp32 on the phantom test split.

    python benchmarks/bf16_drift.py [--model DIR] [--maps 48] [--out benchmarks/results]

Runs FTDDM + DPM-Solver++ (20 steps) with the same seed on TorchBackend at fp32 and at bf16, on the
same test maps at s = 8, 4, 2 (both mask protocols), and writes OUT/bf16_drift.{json,md}: PSNR / SSIM
of each against the truth, their difference, and the max |bf16 - fp32| of the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.engine.pipeline import SamplerSpec  # noqa: E402
from ftddm_trt.engine.torch_backend import TorchBackend  # noqa: E402
from ftddm_trt.evaluation.quality import Method, run_quality  # noqa: E402
from ftddm_trt.models.model_set import ModelSet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--maps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    models = ModelSet.open(args.model)
    method = [Method("FTDDM + DPM-Solver++ 20", SamplerSpec("ftddm-dpmpp", steps=20), "FTDDM + DPM-Solver++")]
    runs = {}
    for precision in ("fp32", "bf16"):
        with TorchBackend(models, precision=precision) as backend:
            runs[precision] = run_quality(backend, method, n_maps=args.maps, ddpm_maps=0, batch_size=args.batch_size)
    rows = []
    for a, b in zip(runs["fp32"]["runs"], runs["bf16"]["runs"]):
        if a["method"] == "zero-filled":
            continue
        rows.append(
            {
                "s": a["s"],
                "protocol": a["protocol"],
                "psnr_fp32": a["all"]["psnr"],
                "psnr_bf16": b["all"]["psnr"],
                "ssim_fp32": a["all"]["ssim"],
                "ssim_bf16": b["all"]["ssim"],
                "psnr_drift_db": b["all"]["psnr"] - a["all"]["psnr"],
                "ssim_drift": b["all"]["ssim"] - a["all"]["ssim"],
                "s_per_map_fp32": a["seconds_per_map"],
                "s_per_map_bf16": b["seconds_per_map"],
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_drift.json").write_text(
        json.dumps({"maps": args.maps, "model": models.hashes(), "rows": rows}, indent=1)
    )
    lines = [f"# bf16 autocast vs fp32 (PyTorch backend, CPU), FTDDM + DPM-Solver++ 20, {args.maps} test maps", "",
             "| s | protocol | PSNR fp32 | PSNR bf16 | drift (dB) | SSIM fp32 | SSIM bf16 | s/map fp32 | s/map bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['s']:g} | {r['protocol']} | {r['psnr_fp32']:.2f} | {r['psnr_bf16']:.2f} | {r['psnr_drift_db']:+.3f} "
            f"| {r['ssim_fp32']:.4f} | {r['ssim_bf16']:.4f} | {r['s_per_map_fp32']:.3f} | {r['s_per_map_bf16']:.3f} |"
        )
    (args.out / "bf16_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
