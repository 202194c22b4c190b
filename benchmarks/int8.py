"""int8 against fp32 on ONNX Runtime (CPU): per-evaluation latency of the UNet and the dB parity of the default sampler.

    nice python benchmarks/int8.py [--out benchmarks/results]
    python benchmarks/int8.py --quick --out /tmp/int8-smoke      # smoke run: fewer maps, repeats, cells

Speed: one UNet evaluation at batch 1 and 8, fp32 and int8 sessions timed in blocks that alternate A B A B
in one run (medians, ratio), for the shipped model (its int8 export, ``export.int8``) and for the paper-size
UNet (random weights, quantized with a short calibration: speed does not depend on the weights' values).
Quality: the shipped model's default sampler (``workflows.export.int8_parity``) with the fp32 and the int8
export on held-out phantom maps (style ``ribbon``, never trained or calibrated on) at s = 2, 4, 8 and both
mask protocols; PSNR in dB against the truth, paired per map (same seeds).

Writes OUT/int8.json (every sample) and OUT/int8.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness.hardware import load_average, machine_facts, machine_lines  # noqa: E402
from benchmarks.harness.timing import NOISE_NOTE, interleaved_times  # noqa: E402
from benchmarks.harness.workloads import cached_onnx_export, paper_unet  # noqa: E402
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE  # noqa: E402
from ftddm_trt.evaluation.generalization import style_maps  # noqa: E402
from ftddm_trt.evaluation.report import md_table, portable, write_json  # noqa: E402
from ftddm_trt.export.int8 import (  # noqa: E402
    CalibrationReader,
    CalibrationSettings,
    Int8Export,
    calibration_pools,
    export_int8,
    quantize_unet,
    trajectory_feeds,
)
from ftddm_trt.export.onnx_export import random_inputs  # noqa: E402
from ftddm_trt.models import count_parameters  # noqa: E402
from ftddm_trt.models.model_set import ModelSet  # noqa: E402
from ftddm_trt.workflows.export import PARITY_CELLS, int8_parity  # noqa: E402

#: Subjects of the held-out style the dB parity is measured on: a seed no other run used (the calibration
#: percentile was chosen on the generalization seed's subjects, so those are spent for this claim).
PARITY_SEED = 3034


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session with the settings of ``OnnxRuntimeBackend``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def time_pair(fp32: Path, int8: Path, batches: tuple[int, ...], repeats: dict[int, int], threads: int,
              rounds: int) -> list[dict]:
    """Per-evaluation latency of the two graphs at each batch, interleaved; one row per batch."""
    sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    rows = []
    for b in batches:
        feeds = {k: v.numpy() for k, v in random_inputs("unet", b, torch.Generator().manual_seed(b)).items()}
        fns = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
        for fn in fns.values():  # warm up
            fn()
            fn()
        t = interleaved_times(fns, repeats[b], rounds=rounds)
        rows.append({"batch": b, "fp32": t["fp32"].to_dict(), "int8": t["int8"].to_dict(),
                     "speedup": t["fp32"].median / t["int8"].median})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where int8.{json,md} go")
    ap.add_argument("--quick", action="store_true", help="smoke run (not a measurement)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores, at most 2)")
    ap.add_argument("--maps", type=int, default=16, help="held-out maps per parity cell")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-size UNet")
    ap.add_argument("--seed", type=int, default=PARITY_SEED,
                    help="seed of the held-out parity subjects (fresh: the calibration settings were chosen on others)")
    args = ap.parse_args(argv)
    if args.quick and args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        print("error: --quick results are not measurements; pass --out elsewhere", file=sys.stderr)
        return 2
    threads = args.threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    machine = machine_facts()
    result: dict = {"machine": machine, "threads": threads, "quick": args.quick, "speed": {}}
    work = Path(tempfile.mkdtemp(prefix="ftddm-int8-bench-"))

    # the shipped model: its fp32 export (cached), its int8 export (unet quantized, as the default sampler runs it)
    models = ModelSet.open(None)
    fp32_dir = cached_onnx_export(models, log=print)
    settings = CalibrationSettings(batches=1, steps=4) if args.quick else CalibrationSettings()
    int8_dir = work / "shipped-int8"
    t0 = time.perf_counter()
    manifest = export_int8(models, int8_dir, Int8Export(calibration=settings, fp32_export=fp32_dir, networks=("unet",)),
                           log=print)
    result["shipped_export"] = {"seconds": time.perf_counter() - t0, "calibration": manifest["int8"]["calibration"],
                                "unet": manifest["networks"]["unet"]["int8"],
                                "parameters": count_parameters(models.load_torch()["unet"])}
    reps = {1: 10, 8: 4} if args.quick else {1: 40, 8: 16}
    print("timing the shipped UNet ...")
    result["speed"]["shipped (cpu preset)"] = time_pair(fp32_dir / "unet.onnx", int8_dir / "unet.onnx", (1, 8), reps,
                                                        threads, rounds=2 if args.quick else 4)

    # the paper-size UNet (random weights): speed only
    if not args.no_paper:
        print("the paper-size UNet (random weights) ...")
        paper = paper_unet(preset="tiny" if args.quick else "paper", log=print)
        src = paper.onnx_dir / "unet.onnx"
        short = CalibrationSettings(subjects=1, batches=1, batch_size=2, steps=4)
        pool, _ = calibration_pools(short)
        dst = work / "paper-unet-int8.onnx"
        t0 = time.perf_counter()
        record = quantize_unet(src, dst, CalibrationReader(trajectory_feeds(src, pool, short, 100)), short)
        result["paper_quantization"] = {"seconds": time.perf_counter() - t0, "parameters": paper.parameters,
                                        "preset": paper.preset, **record}
        print("timing the paper-size UNet ...")
        reps = {1: 4, 8: 2} if args.quick else {1: 12, 8: 4}
        result["speed"][f"paper size ({paper.parameters / 1e6:.1f} M, random weights)"] = time_pair(
            src, dst, (1, 8), reps, threads, rounds=2 if args.quick else 4)

    # quality: the default sampler on held-out maps
    print(f"dB parity on held-out {HELD_OUT_STYLE} maps ...")
    pool, _ = style_maps(HELD_OUT_STYLE, n_subjects=2, seed=args.seed)
    cells = PARITY_CELLS[:2] if args.quick else PARITY_CELLS
    n_maps = 4 if args.quick else args.maps
    t0 = time.perf_counter()
    parity = int8_parity(fp32_dir, int8_dir, pool, n_maps=n_maps, cells=cells, seed=0, batch_size=16,
                         threads=threads)
    result["parity"] = {"style": HELD_OUT_STYLE, "subject_seed": args.seed, "seconds": time.perf_counter() - t0,
                        **parity}
    result["load_after"] = load_average()
    result["seconds"] = time.perf_counter() - t_start
    result = portable(result)
    path = write_json(args.out / "int8.json", result)
    (args.out / "int8.md").write_text(markdown(result))
    print(f"wrote {path} and {args.out / 'int8.md'} in {result['seconds']:.0f} s")
    return 0


def markdown(r: dict) -> str:
    """The tables of int8.md."""
    lines = ["# int8 against fp32 on ONNX Runtime (CPU)", "",
             "`ftddm-trt export --int8`: int8 QDQ UNet graphs (Conv layers, int8 weights per output channel, "
             "uint8 activations), calibrated on sampling trajectories of the model's own phantom data; the first "
             "and last convolution, the t/s embeddings, the norms, attention and the flow stay fp32. "
             f"{r['threads']} intra-op threads.", "",
             "## Latency per UNet evaluation", "",
             "fp32 and int8 sessions timed in alternating blocks in one run (A B A B); median ms per call.", ""]
    rows = []
    for label, entries in r["speed"].items():
        for e in entries:
            rows.append([label, e["batch"], f"{e['fp32']['median_ms']:.1f}", f"{e['int8']['median_ms']:.1f}",
                         f"{e['speedup']:.2f}x", f"{e['fp32']['repeats']} / {e['int8']['repeats']}"])
    lines += md_table(["network", "batch", "fp32 ms", "int8 ms", "fp32 / int8", "repeats"], rows)
    p = r["parity"]
    lines += ["", "## Quality: the default sampler on held-out maps", "",
              f"FTDDM + DPM-Solver++ {p['sampler']['steps']}, tau_f {p['sampler']['tau_f']:g} (`upscale`'s default), "
              f"data consistency on for hr, off for lr; {p['maps_per_cell']} maps of style `{p['style']}` per cell "
              "(never trained or calibrated on), the same seeds for both; PSNR inside the truth's quality mask.", ""]
    lines += md_table(["s", "protocol", "maps", "PSNR fp32 (dB)", "PSNR int8 (dB)", "int8 - fp32 (dB)",
                       "worst map (dB)"],
                      [[f"{c['s']:g}", c["protocol"], c["maps"], f"{c['psnr_fp32_db']:.2f}", f"{c['psnr_int8_db']:.2f}",
                        f"{c['difference_db']:+.3f}", f"{c['worst_map_difference_db']:+.3f}"] for c in p["cells"]])
    lines += ["", f"Mean difference {p['mean_difference_db']:+.3f} dB; "
              f"worst cell {p['worst_cell_difference_db']:+.3f} dB.", ""]
    u = r["shipped_export"]["unet"]
    lines += ["## Calibration", "",
              f"Shipped UNet: {u['quantized_convs']} of {u['convs']} convolutions int8, {u['calibration_batches']} "
              f"calibration batches ({r['shipped_export']['calibration']['method']} "
              f"{r['shipped_export']['calibration']['percentile']:g}), relative error on held-out trajectory inputs: "
              f"eps {u['check']['eps_relative_error']:.3f}, implied x0 {u['check']['x0_relative_error']:.4f}; "
              f"export took {r['shipped_export']['seconds']:.0f} s.", ""]
    lines += ["## Machine", "", NOISE_NOTE, "", *machine_lines(r["machine"], r.get("load_after")),
              f"- whole run: {r['seconds']:.0f} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
