"""The breakpoint study: down to which acquired size N x N does the default sampler still help?

    python benchmarks/breakpoint.py [--model DIR] [--write-model] [--out benchmarks/results]

Super-resolves maps of the held-out phantom style (never trained on) acquired at N = 2, 4, 6, 8, 12, 16,
32 (s = 32 to 2) in both mask protocols with ``upscale``'s default sampler (the model's distilled student
where it has one, else the solver), followed by the corrections ``upscale`` applies, and scores each
against zero-filled: mean PSNR / SSIM gain and the share of maps better than zero-filled.

The criterion is fixed in ``data.breakpoint`` (usable: at least +1 dB on average and 90 % of maps better,
in both protocols). The breakpoint is *chosen* on subjects of ``--choose-seed`` and *reported* on fresh
subjects of ``--seed``, whose figures are the ones ``upscale`` quotes. ``--write-model`` writes the
result as ``breakpoint.json`` into the model folder. Writes OUT/breakpoint.{json,md,png}.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftddm_trt.constants import TRAINED_LR_SIZES, USER_DEFAULT_TAU_F  # noqa: E402
from ftddm_trt.data.breakpoint import (  # noqa: E402
    MIN_BETTER_FRACTION,
    MIN_GAIN_DB,
    Breakpoint,
    SizeFigures,
    breakpoint_of,
    write_breakpoint,
)
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE  # noqa: E402
from ftddm_trt.engine.factory import open_backend  # noqa: E402
from ftddm_trt.engine.pipeline import SamplerSpec  # noqa: E402
from ftddm_trt.evaluation.generalization import DEFAULT_VARIANTS, Variant, score_maps, style_maps  # noqa: E402
from ftddm_trt.evaluation.report import md_table, write_json  # noqa: E402
from ftddm_trt.models.model_set import ModelSet, distilled_folder, distilled_steps  # noqa: E402

SIZES = (2, 4, 6, 8, 12, 16, 32)
PROTOCOLS = ("lr", "hr")
#: Subjects the breakpoint is chosen on, and the fresh subjects its reported figures come from; both are
#: used by no training run and no other benchmark.
CHOOSE_SEED = 3040
SEED = 3041


def default_variant(models: ModelSet) -> tuple[Path, Variant]:
    """The folder and variant of ``upscale``'s default sampler for ``models``: its distilled student, else
    the solver."""
    try:
        folder = distilled_folder(models.root)
    except FileNotFoundError:
        return models.root, DEFAULT_VARIANTS[0]
    steps = distilled_steps(folder)
    spec = SamplerSpec("ftddm-distilled", steps=steps, tau_f=USER_DEFAULT_TAU_F)
    return folder, Variant(f"ftddm-distilled, {steps} step(s)", spec, qc_weight=None)


def measure(backend, models: ModelSet, variant: Variant, seed: int, subjects: int, maps: int,
            batch_size: int) -> list[dict]:
    """One row per (N, protocol): the default's PSNR / SSIM, gains over zero-filled, share of maps better."""
    pool, idx = style_maps(HELD_OUT_STYLE, n_subjects=subjects, n_maps=maps, seed=seed)
    rows = []
    for n in SIZES:
        for protocol in PROTOCOLS:
            zf, row = score_maps(backend, pool, idx, [variant], n, protocol, batch_size=batch_size,
                                 fine_mask_net=models.fine_mask_net())
            rows.append({**row, "zero_filled_psnr": zf["psnr"], "zero_filled_ssim": zf["ssim"]})
            print(f"seed {seed} N = {n} {protocol}: {row['psnr']:.2f} dB ({row['psnr_gain']:+.2f}), "
                  f"{100 * row['better_than_zero_filled']:.0f}% better", flush=True)
    return rows


def figures_of(rows: list[dict]) -> list[SizeFigures]:
    """Per N, the gains and shares of ``rows`` as ``data.breakpoint`` reads them."""
    return [SizeFigures(n, {r["protocol"]: r["psnr_gain"] for r in rows if r["n"] == n},
                        {r["protocol"]: r["better_than_zero_filled"] for r in rows if r["n"] == n})
            for n in sorted({r["n"] for r in rows})]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--maps", type=int, default=64, help="maps per cell")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--choose-seed", type=int, default=CHOOSE_SEED, help="subjects the breakpoint is chosen on")
    ap.add_argument("--seed", type=int, default=SEED, help="fresh subjects the reported figures come from")
    ap.add_argument("--write-model", action="store_true", help="write breakpoint.json into the model folder")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    models = ModelSet.open(args.model)
    folder, variant = default_variant(models)
    t0 = time.time()
    with open_backend(args.backend, model=folder, log=print) as backend:
        chosen_rows = measure(backend, models, variant, args.choose_seed, args.subjects, args.maps, args.batch_size)
        rows = measure(backend, models, variant, args.seed, args.subjects, args.maps, args.batch_size)
    chosen = breakpoint_of(figures_of(chosen_rows), source=f"seed {args.choose_seed}")
    fresh = breakpoint_of(figures_of(rows), source=f"seed {args.seed}")
    source = (f"{variant.label} on the held-out style `{HELD_OUT_STYLE}`, {args.maps} maps of {args.subjects} "
              f"fresh subjects (seed {args.seed}); breakpoint chosen on seed {args.choose_seed}")
    result = {"style": HELD_OUT_STYLE, "subjects": args.subjects, "maps": args.maps, "backend": args.backend,
              "batch_size": args.batch_size, "sampler": variant.label, "model": str(models.root),
              "sha256": models.hashes(), "machine": platform.platform(), "seconds": round(time.time() - t0, 1),
              "criterion": {"min_gain_db": MIN_GAIN_DB, "min_better_fraction": MIN_BETTER_FRACTION},
              "choose_seed": args.choose_seed, "seed": args.seed, "breakpoint": chosen.n,
              "breakpoint_on_fresh_subjects": fresh.n, "choose_rows": chosen_rows, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "breakpoint.json", result)
    plot(result, args.out / "breakpoint.png")
    (args.out / "breakpoint.md").write_text(markdown(result))
    print(markdown(result))
    if args.write_model:
        bp = Breakpoint(chosen.n, tuple(sorted(figures_of(rows), key=lambda f: f.n)), source)
        print(f"wrote {write_breakpoint(models.root, bp)}")
    return 0


def markdown(result: dict) -> str:
    """The per-size table on the fresh subjects and the breakpoint, chosen and confirmed."""
    crit = result["criterion"]
    lines = [
        "# Breakpoint: the smallest acquisition the default still improves",
        "",
        f"`upscale`'s default sampler ({result['sampler']}) on the held-out style `{result['style']}` (never trained "
        f"on), {result['maps']} maps of {result['subjects']} subjects per cell, backend {result['backend']}, acquired "
        f"at N x N and super-resolved to 64 x 64, followed by `upscale`'s corrections. PSNR / SSIM inside the truth's "
        f"quality mask; gains are over the zero-filled input. The model was trained on N = "
        f"{min(TRAINED_LR_SIZES)} to {max(TRAINED_LR_SIZES)}: below that it extrapolates its scale conditioning.",
        "",
        f"A size is usable when, in both protocols, the mean PSNR gain is at least {crit['min_gain_db']:+g} dB and at "
        f"least {100 * crit['min_better_fraction']:.0f} % of the maps are better than zero-filled; the breakpoint is "
        "the smallest N from which every measured size up is usable. The criterion was fixed before measuring.",
        "",
        f"- Breakpoint chosen on subjects of seed {result['choose_seed']}: **N = {result['breakpoint']}** "
        f"(s = {64 / result['breakpoint']:g}).",
        f"- On the fresh subjects below (seed {result['seed']}) the same criterion gives N = "
        f"{result['breakpoint_on_fresh_subjects']}"
        + (" (confirmed)." if result["breakpoint_on_fresh_subjects"] == result["breakpoint"] else " (differs)."),
        f"- `upscale` refuses N below {result['breakpoint']} unless `--accept below-breakpoint`, and notes the "
        f"measured figure for N from {result['breakpoint']} to {min(TRAINED_LR_SIZES) - 2}.",
        "",
        "![gain against N](breakpoint.png)",
        "",
    ]
    table = [[r["n"], f"{64 / r['n']:g}", r["protocol"], r["zero_filled_psnr"], r["psnr"], r["psnr_gain"],
              r["ssim_gain"], f"{100 * r['better_than_zero_filled']:.0f} %",
              "yes" if r["n"] >= result["breakpoint"] else "no"] for r in result["rows"]]
    lines += md_table(["N", "s", "protocol", "zero-filled PSNR (dB)", "default PSNR (dB)", "PSNR gain (dB)",
                       "SSIM gain", "maps better than zero-filled", "runs without --accept"], table)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """PSNR gain and share of maps better than zero-filled against N, per protocol, the breakpoint marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for protocol in PROTOCOLS:
        rows = [r for r in result["rows"] if r["protocol"] == protocol]
        axes[0].plot([r["n"] for r in rows], [r["psnr_gain"] for r in rows], "o-", label=protocol)
        axes[1].plot([r["n"] for r in rows], [100 * r["better_than_zero_filled"] for r in rows], "o-", label=protocol)
    axes[0].axhline(MIN_GAIN_DB, color="grey", ls=":")
    axes[1].axhline(100 * MIN_BETTER_FRACTION, color="grey", ls=":")
    for ax, label in zip(axes, ("PSNR gain over zero-filled (dB)", "maps better than zero-filled (%)")):
        ax.axvline(result["breakpoint"], color="C3", ls="--", label=f"breakpoint N = {result['breakpoint']}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SIZES, [str(n) for n in SIZES])
        ax.set_xlabel("acquired N (N x N)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{result['sampler']}, held-out style {result['style']}, seed {result['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
