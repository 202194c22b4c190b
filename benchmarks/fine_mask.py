"""What the model's learned fine mask buys the `lr` qc consistency step, per phantom style.

    python benchmarks/fine_mask.py [--model DIR] [--subjects 4] [--maps 48] [--out benchmarks/results]

On the generalization benchmark's subjects (seed 2026, never used in training) of every style, the
held-out one included, the default sampler's `lr` outputs get the qc step through: nothing, the qc maps'
own estimate F (weight 0.2, the step of models without an estimator), the model's estimator at its
recorded threshold and weight (what `upscale` does), at every other (threshold, weight) of the grid
`ftddm-trt add-fine-mask` chose from, and the truth's quality mask (an oracle no user has). Writes
OUT/fine_mask.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE, TRAIN_STYLES  # noqa: E402
from ftddm_trt.engine.factory import open_backend  # noqa: E402
from ftddm_trt.evaluation.fine_mask import score_steps  # noqa: E402
from ftddm_trt.evaluation.generalization import GENERALIZATION_SEED, style_maps  # noqa: E402
from ftddm_trt.evaluation.report import md_table, write_json  # noqa: E402
from ftddm_trt.models.model_set import FINE_MASK_FILE, ModelSet  # noqa: E402
from ftddm_trt.models.unet import count_parameters  # noqa: E402

SCALES = (8, 16, 32)


def label(r: dict, chosen: tuple[float, float]) -> str:
    if r["mask"] == "learned":
        mark = " (the model's: upscale's default)" if (r["threshold"], r["weight"]) == chosen else ""
        return f"learned, threshold {r['threshold']:g}, weight {r['weight']:g}{mark}"
    return f"{r['mask']}, weight {r['weight']:g}" if r["weight"] else r["mask"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="model folder with fine_mask.* (default: the shipped model)"
    )
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--subjects", type=int, default=4, help="subjects per style")
    ap.add_argument("--maps", type=int, default=48, help="maps per style")
    ap.add_argument("--styles", default=",".join([HELD_OUT_STYLE, *TRAIN_STYLES]))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    models = ModelSet.open(args.model)
    net = models.fine_mask_net()
    if net is None:
        raise SystemExit(
            f"{models.root} has no fine-mask estimator ({FINE_MASK_FILE}.safetensors); add one with `ftddm-trt "
            "add-fine-mask`"
        )
    chosen = (net.config.threshold, net.config.consistency_weight)
    t0 = time.time()
    rows: list[dict] = []
    with open_backend(args.backend, model=args.model, log=print) as backend:
        for style in args.styles.split(","):
            pool, idx = style_maps(style, args.subjects, args.maps, seed=GENERALIZATION_SEED)
            for n in SCALES:
                got = [{"style": style, **r} for r in score_steps(backend, net, pool, idx, n)]
                rows += got
                mine = next(r for r in got if r["mask"] == "learned" and (r["threshold"], r["weight"]) == chosen)
                print(f"{style:8s} s={64 // n}: none {got[0]['psnr_gain']:+.2f}, F {got[1]['psnr_gain']:+.2f}, "
                      f"learned {mine['psnr_gain']:+.2f} dB (Dice F {got[1]['dice']:.3f}, learned {mine['dice']:.3f})")
    entry = models.manifest().get("networks", {}).get(FINE_MASK_FILE, {})
    record = {
        "model": str(args.model or "shipped"),
        "fine_mask_sha256": models.fine_mask_sha256(),
        "threshold": chosen[0],
        "weight": chosen[1],
        "training": entry.get("training"),
        "seed": GENERALIZATION_SEED,
        "subjects": args.subjects,
        "maps": args.maps,
        "backend": args.backend,
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "fine_mask.json", record)
    training = entry.get("training") or {}
    lines = [
        "# A learned fine mask for the `lr` qc consistency step",
        "",
        f"The model's fine-mask estimator (`models.fine_mask`, {count_parameters(net):,} parameters; trained by "
        f"`ftddm-trt add-fine-mask` for {training.get('minutes', '?')} minutes, {training.get('iterations', '?')} "
        f"iterations, on the training fold of the model's own phantoms; threshold {chosen[0]:g} and weight "
        f"{chosen[1]:g} chosen on its validation fold as the best worst-case gain over s). Scored on the "
        "generalization benchmark's "
        f"subjects ({args.subjects} per style, seed {GENERALIZATION_SEED}, {args.maps} maps per style; "
        f"`{HELD_OUT_STYLE}` "
        f"was never trained on), the model's default sampler on backend {args.backend}, `lr` protocol, the same "
        "outputs in every row of a style; PSNR (gain over zero-filled) / SSIM inside the truth's quality mask, and the "
        "Dice overlap of the mask used with the truth's. Written by `python benchmarks/fine_mask.py`.",
        "",
    ]
    for style in args.styles.split(","):
        mine = [r for r in rows if r["style"] == style]
        keys = list(dict.fromkeys(label(r, chosen) for r in mine))
        if style != HELD_OUT_STYLE:  # the full grid for the held-out style only
            keys = [k for k in keys if not k.startswith("learned") or "upscale's default" in k]
        table = []
        for k in keys:
            cells = []
            for n in SCALES:
                r = next(r for r in mine if label(r, chosen) == k and r["n"] == n)
                dice = "" if r["dice"] is None else f", Dice {r['dice']:.3f}"
                cells.append(f"{r['psnr']:.2f} ({r['psnr_gain']:+.2f}) / {r['ssim']:.3f}{dice}")
            table.append([k, *cells])
        title = f"### `{style}`" + (" (held out)" if style == HELD_OUT_STYLE else "")
        lines += [title, "", *md_table(["qc step through", "s = 8", "s = 4", "s = 2"], table), ""]
    (args.out / "fine_mask.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
