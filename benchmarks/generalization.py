"""Generalization across phantom styles: the shipped model on styles it was and was not trained on.

    python benchmarks/generalization.py [--model DIR] [--subjects 4] [--maps 48] [--out benchmarks/results]

Draws fresh subjects of every phantom style with a seed no training run uses, super-resolves the same
maps with the default sampler (and the posterior mean of 4 samples) at s = 8, 4, 2 under both mask
protocols, and writes OUT/generalization.{json,md,png}: PSNR / SSIM and the gain over zero-filled.
The style the shipped model never saw (``data.phantom_styles.HELD_OUT_STYLE``) is marked held out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.constants import QC_CONSISTENCY_WEIGHT  # noqa: E402
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE, STYLES, TRAIN_STYLES  # noqa: E402
from ftddm_trt.engine.factory import open_backend  # noqa: E402
from ftddm_trt.evaluation.generalization import run_generalization, write_results  # noqa: E402
from ftddm_trt.models.model_set import ModelSet  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--subjects", type=int, default=4, help="subjects per style")
    ap.add_argument("--maps", type=int, default=48, help="maps per style, the same for every method")
    ap.add_argument("--styles", default=",".join([HELD_OUT_STYLE, *TRAIN_STYLES]))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    models = ModelSet.open(args.model)
    trained_on = sorted({s for net in models.manifest().get("networks", {}).values()
                         for s in ((net.get("train_config") or {}).get("styles") or ["classic"])})
    held_out = [s for s in STYLES if s not in trained_on]
    with open_backend(args.backend, model=args.model, log=print) as backend:
        mask_net = models.fine_mask_net()  # the qc step goes through it, as in upscale --model
        results = run_generalization(backend, args.styles.split(","), n_subjects=args.subjects, n_maps=args.maps,
                                     fine_mask_net=mask_net)
    results["trained_on_styles"] = trained_on
    preamble = (
        f"Model trained on phantom styles {', '.join(trained_on)}; held out: {', '.join(held_out) or 'none'}. "
        f"{args.subjects} fresh subjects per style (dataset seed {results['seed']}, never used in training), "
        f"{args.maps} maps per style, the same maps and seed for every method, backend {args.backend}, batch "
        f"{results['batch_size']}. PSNR / SSIM inside the truth's quality mask; gain = method - zero-filled "
        "(dB, mean over maps). `lr`: the mask a user has (N x N qc maps, dilated); `hr`: the paper's 64x64 mask. "
        "Data consistency is on for `hr` and off for `lr`; in `lr` the outputs then get the qc consistency step as "
        "`upscale` does by default: "
        + (
            f"through the model's learned fine-mask estimate (threshold {mask_net.config.threshold:g}), "
            f"weight {mask_net.config.consistency_weight:g}; "
            if mask_net is not None
            else f"weight {QC_CONSISTENCY_WEIGHT:g}, through the fine mask the N x N qc maps imply; "
        )
        + "the last `lr` row is the default without that step (the same draws). "
        "Written by `python benchmarks/generalization.py`."
    )
    paths = write_results(results, args.out, held_out=held_out, preamble=preamble)
    print("wrote", ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
