"""Speed and quality of every sampler, fp32 and int8, with the diffusers peers, measured in one run.

    nice python benchmarks/speed_quality.py [--out benchmarks/results]
    python benchmarks/speed_quality.py --quick --out /tmp/sq-smoke      # smoke run: tiny sizes, not a measurement

Samplers: DDPM-1000, DDPM respaced 100, DPM-Solver++ 20 (from noise), FTDDM-101, the default (flow +
DPM-Solver++ 20) and ``ftddm-distilled`` (the model's ``distilled/`` student), each on the fp32 and the
int8 ONNX export (``export.int8``: the UNets int8, the flow fp32), on ONNX Runtime.

1. Per-slice latency, for the shipped model and for the paper-size networks (random weights: speed does
   not depend on the weights' values), at batch 1 and at the best batch. Each network evaluation (UNet,
   flow) is timed at each batch in blocks that alternate fp32 / int8 (medians); a sampler's latency is
   its UNet evaluations times the UNet's median plus its flow evaluation, per image. The samplers whose
   call is short enough (under ``--measure-below`` seconds) are also timed end to end, the whole
   sampling loop included, which checks that sum.
2. Peers at paper size, in the same run: a diffusers ``UNet2DModel`` of the same size on ONNX Runtime
   (one evaluation), and a diffusers loop (``DPMSolverMultistepScheduler``, 20 steps, the UNet2DModel in
   torch eager) per slice.
3. Quality of the shipped model on maps of the held-out phantom style (``ribbon``, subjects of a seed
   no other run used), s = 8 and 4, both mask protocols: PSNR / SSIM, the gain over zero-filled, and
   seconds per map at equal batch, measured in the same run. The default and the distilled sampler are
   followed by the corrections ``upscale`` applies; the other rows as in the quality table.

Writes OUT/speed_quality.{json,md} and OUT/speed_quality.png (quality against seconds per map).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness.hardware import load_average, machine_facts, machine_lines  # noqa: E402
from benchmarks.harness.timing import NOISE_NOTE, interleaved_times  # noqa: E402
from benchmarks.harness.workloads import cached_onnx_export, random_model_set  # noqa: E402
from ftddm_trt.constants import HR_SIZE, T_DIFFUSION, USER_DEFAULT_TAU_F  # noqa: E402
from ftddm_trt.data.phantom_styles import HELD_OUT_STYLE  # noqa: E402
from ftddm_trt.diffusion import CosineSchedule  # noqa: E402
from ftddm_trt.engine.backend import Backend  # noqa: E402
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from ftddm_trt.engine.pipeline import SamplerSpec, sample_batch  # noqa: E402
from ftddm_trt.evaluation.generalization import Variant, score_maps, style_maps  # noqa: E402
from ftddm_trt.evaluation.quality import paper_methods  # noqa: E402
from ftddm_trt.evaluation.report import md_table, portable, write_json  # noqa: E402
from ftddm_trt.export.int8 import CalibrationSettings, Int8Export, export_int8  # noqa: E402
from ftddm_trt.export.onnx_export import export_into, quiet_exporter, random_inputs  # noqa: E402
from ftddm_trt.models import count_parameters  # noqa: E402
from ftddm_trt.models.model_set import ModelSet, distilled_folder  # noqa: E402

#: Subjects of the held-out style the quality is measured on: a seed no training run, calibration or other
#: benchmark used.
QUALITY_SEED = 3036
PRECISIONS = ("fp32", "int8")
#: Quality cells: (acquisition size N, mask protocol).
QUALITY_CELLS = ((8, "lr"), (8, "hr"), (16, "lr"), (16, "hr"))
SOLVER_LABEL = "solver (flow + DPM-Solver++ 20)"


def samplers(distilled_steps: int) -> list[tuple[str, SamplerSpec, bool]]:
    """(label, spec, is a user-facing sampler followed by ``upscale``'s corrections) for every row."""
    paper = {m.label: m.spec for m in paper_methods(solver_variants=False)}
    return [
        ("DDPM T=1000", paper["DDPM T=1000"], False),
        ("DDPM respaced 100", paper["DDPM respaced 100"], False),
        ("DPM-Solver++ 20", paper["DPM-Solver++ 20"], False),
        ("FTDDM Ttrunc=100", SamplerSpec("ftddm", ttrunc=100), False),
        (SOLVER_LABEL, SamplerSpec("ftddm-dpmpp", tau_f=USER_DEFAULT_TAU_F), True),
        (f"ftddm-distilled, {distilled_steps} step(s)",
         SamplerSpec("ftddm-distilled", steps=distilled_steps, tau_f=USER_DEFAULT_TAU_F), True),
    ]


def evaluations(spec: SamplerSpec) -> tuple[int, int]:
    """(UNet evaluations, flow evaluations) per image of ``spec``."""
    flow = 1 if spec.uses_flow else 0
    return spec.nfe - flow, flow


# --------------------------------------------------------------------------------------------- exports

def int8_export(models: ModelSet, fp32_dir: Path, out: Path, settings: CalibrationSettings,
                log: Callable[[str], None]) -> Path:
    """The int8 export of ``models`` (every UNet it has quantized, the flow fp32) in ``out``."""
    networks = tuple(n for n in ("unet", "unet_full") if n in models.hashes())
    export_int8(models, out, Int8Export(calibration=settings, fp32_export=fp32_dir, networks=networks, parity=None,
                                        max_loss_db=None), force=True, log=log)
    return out


def paper_model(work: Path, preset: str, log: Callable[[str], None]) -> tuple[ModelSet, Path]:
    """The paper-size networks with random weights and their fp32 ONNX export (no parity gate: the weights
    are random, only speed is measured). The flow keeps its initial weights (zero-initialised heads): a
    perturbed random flow of this depth overflows float32, and its speed does not depend on the values."""
    folder = work / "paper-model"
    random_model_set(folder, preset, networks=("unet", "unet_full"), seed=0, perturb=0.02)
    models = random_model_set(folder, preset, networks=("flow",), seed=2, perturb=0.0)
    onnx_dir = work / "paper-onnx"
    onnx_dir.mkdir()
    log(f"exporting the {preset}-size networks (random weights) to ONNX ...")
    export_into(models, onnx_dir, None, log, check_parity=False)
    return models, onnx_dir


# --------------------------------------------------------------------------------------------- latency

def _feeds(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return {**random_inputs("unet", batch, g), "eps": torch.randn(batch, 1, HR_SIZE, HR_SIZE, generator=g),
            "tau": torch.zeros(batch)}


def network_times(backends: dict[str, Backend], batches: tuple[int, ...], repeats: dict[int, int],
                  rounds: int) -> dict[str, dict[int, dict[str, float]]]:
    """{precision: {batch: {"unet": s per call, "flow": s per call}}}: medians, fp32 and int8 alternating."""
    out: dict[str, dict[int, dict[str, float]]] = {p: {} for p in backends}
    for b in batches:
        f = _feeds(b)
        x, y, t, s = (f[k] for k in ("x_t", "y", "t", "s"))
        fns: dict[str, Callable[[], Any]] = {}
        for p, be in backends.items():
            fns[f"{p}/unet"] = lambda be=be: be.unet(x, y, t, s)
            fns[f"{p}/flow"] = lambda be=be: be.flow_reverse(f["eps"], y, f["tau"])
        for fn in fns.values():  # warm up
            fn()
        times = interleaved_times(fns, repeats[b], rounds=rounds)
        for p in backends:
            out[p][b] = {"unet": times[f"{p}/unet"].median, "flow": times[f"{p}/flow"].median,
                         "repeats": times[f"{p}/unet"].repeats}
    return out


def end_to_end(backends: dict[str, Backend], spec: SamplerSpec, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per image of the whole sampling loop at ``batch`` (medians, fp32 and int8 alternating)."""
    f = _feeds(batch)
    y = f["y"].clone()
    y[:, 1] = 1.0  # the whole image inside the mask
    s = f["s"]
    schedule = CosineSchedule(T_DIFFUSION)
    fns = {p: (lambda be=be: sample_batch(be, spec, y, s, torch.Generator().manual_seed(0), schedule))
           for p, be in backends.items()}
    times = interleaved_times(fns, repeats, rounds=min(repeats, 2))
    return {p: times[p].median / batch for p in backends}


def latency_rows(name: str, times: dict[str, dict[int, dict[str, float]]], rows_spec: list, best: int,
                 measured: dict[tuple[str, int], dict[str, float]]) -> list[dict]:
    """One row per (sampler, precision, batch in {1, best}): computed seconds per slice and, where timed,
    the end-to-end figure."""
    rows = []
    for label, spec, _ in rows_spec:
        n_unet, n_flow = evaluations(spec)
        for p in times:
            for b in sorted({1, best}):
                t = times[p][b]
                rows.append({"model": name, "sampler": label, "nfe": spec.nfe, "precision": p, "batch": b,
                             "seconds_per_slice": (n_unet * t["unet"] + n_flow * t["flow"]) / b,
                             "measured_seconds_per_slice": measured.get((label, b), {}).get(p)})
    return rows


def best_batch(times: dict[str, dict[int, dict[str, float]]]) -> int:
    """The batch with the lowest fp32 UNet seconds per image."""
    fp32 = times["fp32"]
    return min(fp32, key=lambda b: fp32[b]["unet"] / b)


def measure_model(name: str, fp32_dir: Path, int8_dir: Path, rows_spec: list, batches: tuple[int, ...],
                  threads: int, quick: bool, measure_below: float, log: Callable[[str], None]) -> dict:
    """Per-evaluation times and per-slice latency of one model's exports."""
    backends = {"fp32": OnnxRuntimeBackend(fp32_dir, threads=threads),
                "int8": OnnxRuntimeBackend(int8_dir, threads=threads)}
    try:
        log(f"{name}: timing one UNet and one flow evaluation at batch {', '.join(map(str, batches))} ...")
        reps = {b: (4 if quick else max(4, 32 // b)) for b in batches}
        times = network_times(backends, batches, reps, rounds=2 if quick else 4)
        best = best_batch(times)
        measured: dict[tuple[str, int], dict[str, float]] = {}
        for label, spec, _ in rows_spec:
            n_unet, n_flow = evaluations(spec)
            for b in sorted({1, best}):
                call = n_unet * times["fp32"][b]["unet"] + n_flow * times["fp32"][b]["flow"]
                if call <= measure_below:
                    log(f"{name}: {label} end to end at batch {b} ...")
                    measured[(label, b)] = end_to_end(backends, spec, b, repeats=2 if quick else 4)
        return {"evaluations": times, "best_batch": best,
                "rows": latency_rows(name, times, rows_spec, best, measured)}
    finally:
        for be in backends.values():
            be.close()


# --------------------------------------------------------------------------------------------- peers

def diffusers_unet(quick: bool) -> torch.nn.Module:
    """A diffusers ``UNet2DModel`` (5 input channels: x_t and the condition, 1 output) of about the size of
    the paper-size UNet."""
    from diffusers import UNet2DModel

    if quick:
        return UNet2DModel(sample_size=HR_SIZE, in_channels=5, out_channels=1, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    return UNet2DModel(sample_size=HR_SIZE, in_channels=5, out_channels=1, block_out_channels=(64, 128, 192, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       layers_per_block=3, attention_head_dim=32)


class _SampleOnly(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.net(sample, timestep).sample


def measure_peers(threads: int, quick: bool, work: Path, log: Callable[[str], None]) -> dict:
    """Per-evaluation time of the diffusers UNet on ONNX Runtime (batch 1, 8) and per-slice time of the
    diffusers DPM-Solver++ 20 loop in torch eager (batch 1, 8)."""
    import onnxruntime as ort
    from diffusers import DPMSolverMultistepScheduler

    torch.manual_seed(0)
    net = diffusers_unet(quick).eval()
    params = count_parameters(net)
    log(f"peers: diffusers UNet2DModel ({params / 1e6:.1f} M), exporting to ONNX ...")
    path = work / "diffusers-unet.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad(), quiet_exporter():
        example = (torch.randn(2, 5, HR_SIZE, HR_SIZE), torch.full((2,), 10.0))
        torch.onnx.export(_SampleOnly(net).eval(), example, str(path), dynamo=True,
                          input_names=["sample", "timestep"], output_names=["out"],
                          dynamic_shapes=({0: batch}, {0: batch}), external_data=False, verbose=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {"parameters": params, "onnxruntime": {}, "loop": {}}
    for b in (1, 8):
        feeds = {"sample": np.random.default_rng(b).standard_normal((b, 5, HR_SIZE, HR_SIZE)).astype(np.float32),
                 "timestep": np.full((b,), 10.0, dtype=np.float32)}
        sess.run(None, feeds)
        t = interleaved_times({"ort": lambda: sess.run(None, feeds)}, 4 if quick else max(4, 32 // b), rounds=2)
        out["onnxruntime"][b] = t["ort"].median

    def loop(b: int) -> None:
        sched = DPMSolverMultistepScheduler(num_train_timesteps=T_DIFFUSION, algorithm_type="dpmsolver++")
        sched.set_timesteps(20)
        cond = torch.zeros(b, 4, HR_SIZE, HR_SIZE)
        x = torch.randn(b, 1, HR_SIZE, HR_SIZE, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            for tt in sched.timesteps:
                eps = net(torch.cat([x, cond], 1), tt).sample
                x = sched.step(eps, tt, x).prev_sample

    for b in (1, 8):
        log(f"peers: the diffusers DPM-Solver++ 20 loop at batch {b} ...")
        loop(b)
        t = interleaved_times({"loop": lambda b=b: loop(b)}, 2, rounds=2)
        out["loop"][b] = t["loop"].median / b
    return out


# --------------------------------------------------------------------------------------------- quality

def measure_quality(shipped: dict[str, Path], student: dict[str, Path], rows_spec: list, n_maps: int,
                    n_subjects: int, batch_size: int, threads: int, cells, fine_mask_net,
                    log: Callable[[str], None]) -> list[dict]:
    """score_maps rows (zero-filled once per cell, then every sampler) for each precision."""
    pool, idx = style_maps(HELD_OUT_STYLE, n_subjects=n_subjects, n_maps=n_maps, seed=QUALITY_SEED)
    rows: list[dict] = []
    for p in PRECISIONS:
        with OnnxRuntimeBackend(shipped[p], threads=threads) as teacher, \
                OnnxRuntimeBackend(student[p], threads=threads) as distilled:
            for n, protocol in cells:
                kw = dict(pool=pool, idx=idx, n=n, protocol=protocol, batch_size=batch_size,
                          fine_mask_net=fine_mask_net)
                log(f"quality {p}: s = {HR_SIZE // n}, {protocol} ...")
                for i, (label, spec, corrected) in enumerate(rows_spec):
                    backend = distilled if spec.distilled_unet else teacher
                    variant = Variant(label, spec, qc_weight=None if corrected else 0.0)
                    got = score_maps(backend, variants=[variant], **kw)
                    keep = got if (p == PRECISIONS[0] and i == 0) else got[1:]
                    rows += [{**r, "precision": p if r["method"] != "zero-filled" else "-"} for r in keep]
    return rows


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="smoke run (tiny sizes; not a measurement)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores, at most 2)")
    ap.add_argument("--maps", type=int, default=16, help="held-out maps per quality cell")
    ap.add_argument("--measure-below", type=float, default=3.0,
                    help="time a sampler end to end where one call takes less than this many seconds")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-size networks and the peers")
    args = ap.parse_args(argv)
    if args.quick and args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        print("error: --quick results are not measurements; pass --out elsewhere", file=sys.stderr)
        return 2
    threads = args.threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_facts(), "threads": threads, "quick": args.quick,
                              "quality_seed": QUALITY_SEED, "style": HELD_OUT_STYLE}
    work = Path(tempfile.mkdtemp(prefix="ftddm-speed-quality-"))
    settings = (CalibrationSettings(subjects=1, batches=1, batch_size=2, steps=4) if args.quick
                else CalibrationSettings())

    models = ModelSet.open(None)
    student_models = ModelSet.open(distilled_folder(models.root))
    steps = int(student_models.manifest()["distilled"]["steps"])
    rows_spec = samplers(steps)
    if args.quick:
        rows_spec = [r for r in rows_spec if r[1].nfe <= 101]
    shipped = {"fp32": cached_onnx_export(models, log=print)}
    student = {"fp32": cached_onnx_export(student_models, log=print)}
    print("int8 exports of the shipped model and of its distilled student ...")
    shipped["int8"] = int8_export(models, shipped["fp32"], work / "shipped-int8", settings, print)
    student["int8"] = int8_export(student_models, student["fp32"], work / "student-int8", settings, print)
    result["parameters"] = {"shipped": {k: count_parameters(v) for k, v in models.load_torch().items()}}

    # 1. latency: the paper-size networks (first: the slowest exports), then the shipped model (the teacher's
    # export runs every sampler; the student has the same UNet size)
    result["latency"] = {}
    if not args.no_paper:
        paper, p_fp32 = paper_model(work, "tiny" if args.quick else "paper", print)
        short = CalibrationSettings(subjects=1, batches=1, batch_size=2, steps=4)
        p_int8 = int8_export(paper, p_fp32, work / "paper-int8", short, print)
        result["parameters"]["paper"] = {k: count_parameters(v) for k, v in paper.load_torch().items()}
        result["latency"]["paper"] = measure_model("paper", p_fp32, p_int8, rows_spec, (1, 8), threads, args.quick,
                                                   args.measure_below, print)
        # 2. peers, same run
        result["peers"] = measure_peers(threads, args.quick, work, print)
    batches = (1, 8) if args.quick else (1, 8, 16)
    result["latency"]["shipped"] = measure_model("shipped", shipped["fp32"], shipped["int8"], rows_spec, batches,
                                                 threads, args.quick, args.measure_below, print)

    # 3. quality
    cells = QUALITY_CELLS[:2] if args.quick else QUALITY_CELLS
    result["quality"] = measure_quality(shipped, student, rows_spec, 4 if args.quick else args.maps,
                                        2 if args.quick else 4, 16, threads, cells, models.fine_mask_net(), print)
    result["load_after"] = load_average()
    result["seconds"] = time.perf_counter() - t_start
    result = portable(result)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "speed_quality.json", result)
    figure(result, args.out / "speed_quality.png")
    (args.out / "speed_quality.md").write_text(markdown(result))
    print(f"wrote {args.out / 'speed_quality.md'} in {result['seconds']:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------- report

def _cells(rows: list[dict]) -> list[tuple[float, str]]:
    return sorted({(r["s"], r["protocol"]) for r in rows}, key=lambda c: (-c[0], c[1]))


def figure(r: dict, path: Path) -> None:
    """PSNR against seconds per map (log), one panel per quality cell; fp32 filled, int8 open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [q for q in r["quality"] if q["method"] != "zero-filled"]
    cells = _cells(rows)
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False)
    methods = list(dict.fromkeys(q["method"] for q in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (s, protocol) in zip(axes[0], cells):
        for q in rows:
            if (q["s"], q["protocol"]) != (s, protocol):
                continue
            filled = q["precision"] == "fp32"
            ax.scatter(q["seconds_per_map"], q["psnr"], s=40, color=colors[q["method"]],
                       facecolors=colors[q["method"]] if filled else "none",
                       label=f"{q['method']} ({q['precision']})")
        zf = next(q for q in r["quality"] if q["method"] == "zero-filled" and (q["s"], q["protocol"]) == (s, protocol))
        ax.axhline(zf["psnr"], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(f"s = {s:g}, {protocol}")
        ax.set_xlabel("seconds per map (batch 16, 2 CPU cores)")
        ax.set_ylabel("PSNR (dB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r: dict) -> str:
    """The tables of speed_quality.md."""
    lines = ["# Speed and quality of every sampler, fp32 and int8", "",
             "ONNX Runtime on the CPU, "
             f"{r['threads']} intra-op threads; int8 = the `export --int8` graphs (UNets int8, flow fp32). "
             "Every figure below comes from one run.", ""]
    for name in [k for k in ("shipped", "paper") if k in r["latency"]]:
        lat = r["latency"][name]
        params = r["parameters"][name]
        desc = ("the shipped model" if name == "shipped" else "the paper-size networks (random weights)")
        lines += [f"## Latency per slice: {desc}", "",
                  f"UNet {params['unet'] / 1e6:.2f} M, flow {params['flow'] / 1e6:.2f} M parameters. Seconds per "
                  f"slice = UNet evaluations x the UNet's median + the flow's, per image, at batch 1 and at the best "
                  f"batch ({lat['best_batch']}); `end to end` times the whole sampling loop where one call is short.",
                  ""]
        table = []
        for row in lat["rows"]:
            e2e = row["measured_seconds_per_slice"]
            table.append([row["sampler"], row["nfe"], row["precision"], row["batch"],
                          f"{row['seconds_per_slice']:.3f}", "-" if e2e is None else f"{e2e:.3f}"])
        lines += md_table(["sampler", "NFE", "precision", "batch", "s / slice", "end to end s / slice"], table)
        ev = lat["evaluations"]
        lines += ["", "One evaluation, ms per call (median): " + "; ".join(
            f"batch {b}: UNet {ev['fp32'][b]['unet'] * 1e3:.1f} fp32 / {ev['int8'][b]['unet'] * 1e3:.1f} int8 "
            f"({ev['fp32'][b]['unet'] / ev['int8'][b]['unet']:.2f}x), flow {ev['fp32'][b]['flow'] * 1e3:.1f}"
            for b in sorted(ev["fp32"], key=int)) + ".", ""]
    if "peers" in r:
        pe = r["peers"]
        ours = r["latency"]["paper"]["evaluations"]
        lines += ["## Peers at paper size (same run)", "",
                  f"diffusers `UNet2DModel` with {pe['parameters'] / 1e6:.1f} M parameters (ours: "
                  f"{r['parameters']['paper']['unet'] / 1e6:.1f} M).", ""]
        table = []
        for b in (1, 8):
            key = b if b in pe["onnxruntime"] else str(b)
            okey = b if b in ours["fp32"] else str(b)
            table.append([b, f"{pe['onnxruntime'][key] * 1e3:.1f}", f"{ours['fp32'][okey]['unet'] * 1e3:.1f}",
                          f"{ours['int8'][okey]['unet'] * 1e3:.1f}", f"{pe['loop'][key]:.3f}"])
        lines += md_table(["batch", "diffusers UNet on ONNX Runtime, ms / evaluation", "ours fp32, ms",
                           "ours int8, ms", "diffusers DPM-Solver++ 20 loop (torch eager), s / slice"], table)
        lines += [""]
    lines += ["## Quality of the shipped model on held-out maps", "",
              f"Style `{r['style']}` (seed {r['quality_seed']}, never trained, calibrated or chosen on), "
              f"{r['quality'][0]['maps']} maps per cell, batch 16. PSNR / SSIM inside the truth's quality mask; "
              "seconds per map measured in this run at equal batch (one timed call of 16 maps per row). The solver "
              "and the distilled sampler (`upscale`'s default) are followed by `upscale`'s corrections (data "
              "consistency in `hr`, the qc step in `lr`).", "",
              "![quality against seconds](speed_quality.png)", ""]
    table = []
    for cell in _cells(r["quality"]):
        rows = [q for q in r["quality"] if (q["s"], q["protocol"]) == cell]
        for q in rows:
            table.append([f"s = {cell[0]:g}, {cell[1]}", q["method"], q["precision"],
                          q.get("spec", {}).get("nfe", 0), f"{q['psnr']:.2f}", f"{q['ssim']:.3f}",
                          "-" if "psnr_gain" not in q else f"{q['psnr_gain']:+.2f}",
                          "-" if "seconds_per_map" not in q else f"{q['seconds_per_map']:.4f}"])
    lines += md_table(["cell", "method", "precision", "NFE", "PSNR (dB)", "SSIM", "gain over zero-filled (dB)",
                       "s / map"], table)
    lines += ["", *summary_lines(r), "", "## Machine", "", NOISE_NOTE, "",
              *machine_lines(r["machine"], r.get("load_after")), f"- whole run: {r['seconds']:.0f} s", ""]
    return "\n".join(lines)


def summary_lines(r: dict) -> list[str]:
    """The distilled sampler (``upscale``'s default) against the solver (the default before), fp32 and int8, per
    cell: PSNR difference and the ratio of seconds per map (one timed call per row: noisy; the latency tables
    above are the careful speed figures)."""
    out = ["### The distilled sampler (the default) against the solver (the default before)", ""]
    table = []
    for cell in _cells(r["quality"]):
        rows = {(q["method"], q["precision"]): q for q in r["quality"] if (q["s"], q["protocol"]) == cell}
        base = rows.get((SOLVER_LABEL, "fp32"))
        for (method, p), q in rows.items():
            if base is None or not method.startswith("ftddm-distilled"):
                continue
            table.append([f"s = {cell[0]:g}, {cell[1]}", p, f"{q['psnr'] - base['psnr']:+.3f}",
                          f"{base['seconds_per_map'] / q['seconds_per_map']:.1f}x"])
    return out + md_table(["cell", "distilled precision", "PSNR - solver fp32 (dB)",
                           "faster per map (one timed call each)"], table)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
