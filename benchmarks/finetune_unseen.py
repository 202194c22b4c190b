"""Fine-tuning on a phantom style the shipped model never saw: 10 subjects, a fixed time budget.

    python benchmarks/finetune_unseen.py [--minutes 10] [--subjects 10] [--out benchmarks/results]

Writes ``--subjects`` high-resolution subjects of the held-out style as a site's training folder,
runs ``ftddm-trt finetune`` on them for ``--minutes`` (2 of them held out for validation), then scores
the base and the fine-tuned model on *other* subjects of that style (indices from 100, never used for
fine-tuning) at s = 8, 4, 2 under both mask protocols. Writes OUT/finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.constants import HR_SIZE  # noqa: E402
from ftddm_trt.data.nifti.write import write_training_subject  # noqa: E402
from ftddm_trt.data.phantom import make_subject  # noqa: E402
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE  # noqa: E402
from ftddm_trt.engine.torch_backend import TorchBackend  # noqa: E402
from ftddm_trt.evaluation.generalization import DEFAULT_VARIANTS, score_maps, style_maps  # noqa: E402
from ftddm_trt.models.model_set import ModelSet  # noqa: E402
from ftddm_trt.training.finetune import FinetuneConfig, finetune, parse_networks, sampler_variant  # noqa: E402

SEED = 3030
#: The fine-tuned model with the sampler settings its validation subjects chose (--passes, --qc-consistency).
CHOSEN = "fine-tuned, validation-chosen"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="base model (default: the shipped model)")
    ap.add_argument("--style", default=HELD_OUT_STYLE)
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--test-subjects", type=int, default=6)
    ap.add_argument("--maps", type=int, default=64)
    ap.add_argument("--learning-rate", dest="lr", type=float, default=FinetuneConfig.lr,
                    help="fine-tuning learning rate")
    ap.add_argument("--margin-weight", type=float, default=FinetuneConfig.margin_weight,
                    help="loss weight of M's voxels outside the truth's quality mask")
    ap.add_argument(
        "--networks", default=",".join(FinetuneConfig.networks), help="networks to fine-tune (comma-separated)"
    )
    ap.add_argument("--keep", type=Path, default=None, help="also keep the fine-tuned model folder here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "site"
        for i in range(args.subjects):
            write_training_subject(data, make_subject(i, SEED, style=args.style))
        tuned = args.keep or Path(tmp) / "tuned"
        t0 = time.perf_counter()
        networks = parse_networks(args.networks)
        manifest = finetune(FinetuneConfig(data_dir=data, out_model=tuned, base_model=args.model, minutes=args.minutes,
                                           lr=args.lr, networks=networks, margin_weight=args.margin_weight),
                            command=f"ftddm-trt finetune --data SITE --out OUT --minutes {args.minutes:g} "
                                    f"--learning-rate {args.lr:g} "
                                    f"--networks {','.join(networks)} --margin-weight {args.margin_weight:g} "
                                    f"--fine-mask-share {FinetuneConfig.fine_mask_share:g}")
        wall = time.perf_counter() - t0
        ft = manifest["finetune"]
        pool, idx = style_maps(args.style, args.test_subjects, args.maps, seed=SEED, first_index=100)
        runs = []
        rec = ft["validation_quality"].get("recommended") or {
            "passes": 1,
            "qc_consistency": None,
        }  # None: upscale's default
        default = DEFAULT_VARIANTS[0]
        chosen = sampler_variant(default, rec["passes"], rec["qc_consistency"], label="validation-chosen")
        for label, folder in (("base", args.model or ModelSet.open().root), ("fine-tuned", tuned)):
            models = ModelSet.open(folder)
            # the qc step as upscale --model FOLDER runs it
            backend, mask_net = TorchBackend(models), models.fine_mask_net()
            for n in (8, 16, 32):
                for protocol in ("lr", "hr"):
                    rows = score_maps(
                        backend,
                        pool,
                        idx,
                        [default] + ([chosen] if label == "fine-tuned" else []),
                        n,
                        protocol,
                        fine_mask_net=mask_net,
                    )
                    runs += [{"model": label if r["method"] != chosen.label else CHOSEN, **r}
                             for r in rows if label == "base" or r["method"] != "zero-filled"]
    result = {"style": args.style, "seed": SEED, "subjects": args.subjects, "minutes": args.minutes, "lr": args.lr,
              "margin_weight": args.margin_weight, "networks": list(networks),
              "wall_seconds": wall, "cpu_threads": os.cpu_count(), "training": ft["training"],
              "validation_quality": ft["validation_quality"], "recommended": rec, "test_subjects": args.test_subjects,
              "maps": int(idx.size), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.json").write_text(json.dumps(result, indent=1))
    iterations = " and ".join(f"{name} ({summary.get('step', summary.get('iterations'))} iterations)"
                              for name, summary in ft["training"].items())
    qc_text = "default" if rec["qc_consistency"] is None else f"{rec['qc_consistency']:g}"
    lines = [
        f"# Fine-tuning on an unseen phantom style (`{args.style}`)",
        "",
        f"`ftddm-trt finetune` on {args.subjects} high-resolution `{args.style}` subjects ({args.subjects - 2} train, "
        f"2 validation) for {args.minutes:g} minutes ({wall / 60:.1f} min wall, {os.cpu_count()} CPU cores), from the "
        f"shipped model, fine-tuning {iterations} at lr {args.lr:g}. Scored on {idx.size} maps of {args.test_subjects} "
        f"*other* `{args.style}` subjects "
        "(never used for fine-tuning), default sampler (in `lr` with the qc step as `upscale` runs it: through each "
        "model's fine-mask estimator when it has one), PSNR / SSIM inside the truth's quality mask; gain = over "
        "zero-filled. The last row runs the fine-tuned model with the sampler settings that scored best on the 2 "
        f"validation subjects (`--passes {rec['passes']} --qc-consistency {qc_text}`, reported by "
        "`ftddm-trt finetune`). Written by `python benchmarks/finetune_unseen.py`.",
        "",
    ]
    for protocol in ("lr", "hr"):
        lines += [
            f"### Mask protocol `{protocol}`",
            "",
            "| model | " + " | ".join(f"s = {HR_SIZE / n:g}" for n in (8, 16, 32)) + " |",
            "|---|---|---|---|",
        ]
        for label in ("zero-filled", "base", "fine-tuned", CHOSEN):
            cells = []
            for n in (8, 16, 32):
                r = next(
                    r
                    for r in runs
                    if r["n"] == n
                    and r["protocol"] == protocol
                    and (
                        r["method"] == "zero-filled"
                        if label == "zero-filled"
                        else (r["model"] == label and r["method"] != "zero-filled")
                    )
                )
                cells.append(
                    f"{r['psnr']:.2f} / {r['ssim']:.3f}"
                    + ("" if label == "zero-filled" else f" ({r['psnr_gain']:+.2f} dB)")
                )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    (args.out / "finetune.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
