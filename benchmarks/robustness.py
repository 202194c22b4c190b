"""Robustness of the ``lr`` protocol: two metabolite families x every qc convention x s = 8, 4, 2.

    python benchmarks/robustness.py [--minutes 10] [--train-subjects 10] [--out benchmarks/results]

Scores the shipped model (``--model``) on fresh subjects of each family (``evaluation.robustness``), and, per
family, two models trained for ``--minutes`` on ``--train-subjects`` other subjects of that family
written as a site's training folder: ``ftddm-trt finetune`` of the shipped model, and a regression UNet
of the same size from scratch (``train --task regression``), the yardstick. Writes
OUT/robustness.{json,md}. ``--minutes 0`` skips both trainings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ftddm_trt.constants import USER_DEFAULT_TAU_F  # noqa: E402
from ftddm_trt.data.nifti.write import write_training_subject  # noqa: E402
from ftddm_trt.data.qc_conventions import BENCHMARK_CONVENTIONS  # noqa: E402
from ftddm_trt.engine.pipeline import SamplerSpec  # noqa: E402
from ftddm_trt.engine.torch_backend import TorchBackend  # noqa: E402
from ftddm_trt.evaluation.report import write_json  # noqa: E402
from ftddm_trt.evaluation.robustness import (  # noqa: E402
    FAMILIES,
    ROBUSTNESS_SEED,
    SCALES_N,
    System,
    family_maps,
    family_subjects,
    score_cell,
    summarize_cells,
)
from ftddm_trt.models.io import load_model  # noqa: E402
from ftddm_trt.models.model_set import ModelSet, distilled_folder, distilled_steps  # noqa: E402
from ftddm_trt.training.finetune import FinetuneConfig, finetune  # noqa: E402
from ftddm_trt.training.objectives import regression_predict  # noqa: E402
from ftddm_trt.training.trainer import TrainConfig, train  # noqa: E402

#: The convention that changes the truth itself (the site's own quality thresholds) runs on its own pool.
STRICT = "strict-thresholds"
TRAIN_FIRST = 100  # training subjects are indices 100.., test subjects 0..


def train_family_models(family: str, n_subjects: int, minutes: float, base: Path | None, work: Path, log,
                        seed: int = ROBUSTNESS_SEED) -> dict:
    """Fine-tune ``base`` and train a regression UNet from scratch, each for ``minutes`` on the same subjects."""
    data = work / f"{family}-site"
    for subj in family_subjects(family, n_subjects, seed=seed, first=TRAIN_FIRST):
        write_training_subject(data, subj)
    t0 = time.perf_counter()
    tuned = work / f"{family}-finetuned"
    manifest = finetune(FinetuneConfig(data_dir=data, out_model=tuned, base_model=base, minutes=minutes),
                        command=f"ftddm-trt finetune --data {family}-site --out {family}-finetuned "
                                f"--minutes {minutes:g}",
                        progress=False, log=log)
    finetune_s = time.perf_counter() - t0
    cfg = TrainConfig(task="regression", preset="cpu", iterations=100_000, batch_size=8, lr=5e-4, lr_final=5e-4,
                      lr_protocol_fraction=0.75, val_every=100, data_dir=str(data), val_subjects=2)
    t0 = time.perf_counter()
    summary = train(cfg, work / f"{family}-regression", max_minutes=minutes, progress=False)
    log(f"{family}: regression UNet {summary['step']} iterations, best validation {summary['best_val']:.4f}")
    return {"finetuned": tuned, "regression": work / f"{family}-regression" / "best",
            "finetune": {"seconds": finetune_s, "validation_quality": manifest["finetune"]["validation_quality"],
                         "training": manifest["finetune"]["training"]},
            "regression_training": {**summary, "seconds_total": time.perf_counter() - t0}}


def distilled_system(model: Path | None, fine_mask_net) -> System | None:
    """The model's distilled student as a system (its sampler ``ftddm-distilled`` at its trained steps), or None
    when the model has none."""
    try:
        folder = distilled_folder(model)
    except FileNotFoundError:
        return None
    spec = SamplerSpec("ftddm-distilled", steps=distilled_steps(folder), tau_f=USER_DEFAULT_TAU_F)
    return System("distilled", TorchBackend(ModelSet.open(folder)), fine_mask_net, spec=spec)


def markdown(results: dict) -> str:
    lines = ["# Robustness of the `lr` protocol: metabolite families x qc conventions x s", "",
             f"Fresh subjects (seed {results['seed']}, {results['test_subjects']} per family, {results['maps']} maps "
             "per cell), scored inside the truth's quality mask (the site's thresholds); PSNR gain over zero-filled in "
             "dB, mean over maps. `tissue`: the tissue-fraction generator, all four styles (ribbon was never trained "
             "on); `fields`: random fields and textures, a family the shipped model never saw and no setting was "
             "chosen on. The fine-tuned and regression rows train for "
             f"{results['minutes']:g} min on {results['train_subjects']} other subjects of the cell's family "
             "(2-core CPU). Made by `python benchmarks/robustness.py`.", ""]
    lines += [
        "## Summary (default, `lr` protocol)",
        "",
        "| family | cells | floor | median | floor s = 4 | median s = 4 | min coverage |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, summ in results["summary"].items():
        d = summ.get("default", {})
        if d:
            lines.append(f"| {family} | {d['cells']} | {d['floor']:+.2f} | {d['median']:+.2f} | {d['floor_s4']:+.2f} | "
                         f"{d['median_s4']:+.2f} | {d['min_coverage']:.4f} |")
    for key in ("all", "distilled", "fine-tuned", "regression"):
        d = results["summary_all"].get(key, {})
        if d:
            lines.append(f"| {key} | {d['cells']} | {d['floor']:+.2f} | {d['median']:+.2f} | {d['floor_s4']:+.2f} | "
                         f"{d['median_s4']:+.2f} | {d['min_coverage']:.4f} |")
    lines.append("")
    conventions = results["conventions"]
    for family in results["families"]:
        for n in results["sizes"]:
            rows = [r for r in results["rows"] if r["family"] == family and r["n"] == n]
            methods = list(dict.fromkeys(r["method"] for r in rows))
            lines += [f"## {family}, s = {64 // n} (N = {n})", "",
                      "| method | " + " | ".join(conventions) + " |", "|---|" + "---|" * len(conventions)]
            for method in methods:
                cells = []
                for conv in conventions:
                    hit = [r for r in rows if r["method"] == method and r["convention"] == conv]
                    cells.append(f"{hit[0]['psnr_gain']:+.2f}" if hit else "")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            cov = [next((r['coverage'] for r in rows if r["convention"] == c), float('nan')) for c in conventions]
            zf = [next((r['psnr'] for r in rows if r["convention"] == c and r["method"] == "zero-filled"), float('nan'))
                  for c in conventions]
            lines.append("| zero-filled PSNR (dB) | " + " | ".join(f"{v:.2f}" for v in zf) + " |")
            lines.append("| coverage of the truth's mask | " + " | ".join(f"{v:.4f}" for v in cov) + " |")
            lines.append("")
    lines += ["`shipped: default`: the shipped model with the solver sampler (flow + 20 DPM-Solver++ steps) and "
              "`upscale`'s corrections; `distilled: default`: its distilled student (`ftddm-distilled`, which "
              "`upscale --sampler auto` runs) with the same corrections. `qc step without the do-no-harm check`: "
              "the qc step applied to "
              "every map. `2 solver passes (checked)`: `--passes 2`, each pass and the qc step kept per map only where "
              "they agree better with the acquired band. Coverage: share of the truth's quality-mask voxels inside M "
              "(the output is cut by M). `qc_kept` in the JSON: share of maps whose qc step the check kept.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--test-subjects", type=int, default=6)
    ap.add_argument("--maps", type=int, default=48)
    ap.add_argument("--train-subjects", type=int, default=10)
    ap.add_argument(
        "--minutes", type=float, default=10.0, help="training budget of the fine-tune and the regression UNet"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=ROBUSTNESS_SEED, help="seed of the test and training subjects")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--stem", default="robustness", help="results are written to OUT/STEM.{json,md}")
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    shipped = ModelSet.open(args.model)
    base = System("shipped", TorchBackend(shipped), shipped.fine_mask_net())
    student = distilled_system(args.model, base.fine_mask_net)
    results: dict = {"seed": args.seed, "test_subjects": args.test_subjects, "maps": args.maps,
                     "train_subjects": args.train_subjects, "minutes": args.minutes, "families": families,
                     "sizes": list(SCALES_N), "conventions": list(BENCHMARK_CONVENTIONS), "model": str(shipped.root),
                     "model_hashes": shipped.hashes(), "training": {}, "rows": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            systems, regression = [base, *([student] if student else [])], None
            if args.minutes > 0:
                trained = train_family_models(family, args.train_subjects, args.minutes, args.model, Path(tmp), print,
                                              seed=args.seed)
                results["training"][family] = {k: v for k, v in trained.items() if k not in ("finetuned", "regression")}
                tuned = ModelSet(trained["finetuned"])
                systems.append(System("fine-tuned", TorchBackend(tuned), tuned.fine_mask_net()))
                reg_net = load_model(trained["regression"]).eval()

                def regression(y: torch.Tensor, s: torch.Tensor, net=reg_net) -> torch.Tensor:
                    return regression_predict(net, y, s)
            subjects = family_subjects(family, args.test_subjects, seed=args.seed)
            for n in SCALES_N:
                for conventions in ([c for c in BENCHMARK_CONVENTIONS if c != STRICT], [STRICT]):
                    pool, idx = family_maps(subjects, args.maps, conventions[0], seed=args.seed)
                    rows = score_cell(systems, pool, idx, n, conventions, regression=regression,
                                      batch_size=args.batch_size)
                    results["rows"] += [{"family": family, **r} for r in rows]
                    print(f"{family} n={n} {','.join(conventions)}: " + ", ".join(
                        f"{r['convention']} {r['psnr_gain']:+.2f}" for r in rows if r["method"] == "shipped: default"),
                        flush=True)
    results["seconds"] = time.perf_counter() - t_start
    results["summary"] = {
        f: {"default": summarize_cells([r for r in results["rows"] if r["family"] == f], "shipped: default")}
        for f in families
    }
    results["summary_all"] = {"all": summarize_cells(results["rows"], "shipped: default"),
                              "distilled": summarize_cells(results["rows"], "distilled: default"),
                              "fine-tuned": summarize_cells(results["rows"], "fine-tuned: default"),
                              "regression": summarize_cells(results["rows"], "regression UNet (trained on the family)")}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.stem}.json", results)
    (args.out / f"{args.stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
