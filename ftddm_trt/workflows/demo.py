"""The main job end to end on the embedded default (no GPU, no server): the logic behind `ftddm-trt demo`.

A phantom subject from the test split -> its N x N scan written as FSL-MRS files -> `upscale` with the
shipped model on ONNX Runtime -> `evaluate` against the subject's 64x64 truth -> a short table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftddm_trt.atomic import atomic_dir, check_output
from ftddm_trt.constants import LR_SIZES
from ftddm_trt.integrity import strict_json
from ftddm_trt.workflows.console import console
from ftddm_trt.workflows.evaluate import evaluate_folders
from ftddm_trt.workflows.upscale import UpscaleError, UpscaleOptions, upscale_to_folder


@dataclass
class DemoResult:
    """What a demo made: the phantom subject's id, the upscale run record and the metrics."""

    subject_id: str
    n: int
    record: dict
    metrics: dict


def run_demo(out: Path, n: int, opts: UpscaleOptions, hr_masks: bool = False, force: bool = False) -> DemoResult:
    """Write ``out`` (input/, sr/, metrics.json) at once: a test-split phantom subject chosen by
    ``opts.seed``, acquired at ``n`` x ``n``, super-resolved with ``opts`` and scored against its truth.

    UpscaleError for a bad ``n`` or a failed run, OutputError for ``out``, EvaluateError when scoring fails."""
    from ftddm_trt.data.nifti.write import write_phantom_subject
    from ftddm_trt.data.phantom import fold_split, make_subject, subject_index

    if n not in LR_SIZES:
        raise UpscaleError(f"--n must be one of {list(LR_SIZES)}, got {n}")
    check_output(out, force, (opts.model,))
    _, _, test_ids = fold_split()
    subject_id = test_ids[opts.seed % len(test_ids)]
    subject = make_subject(subject_index(subject_id), seed=0)
    console.print(
        f"phantom subject {subject.subject_id} (test split): {subject.n_slices} slices, acquired {n}x{n}, s = "
        f"{64 / n:.2f}"
    )
    with atomic_dir(out, force, (opts.model,), command="demo") as tmp:  # the whole demo folder appears at once
        staged_subject = write_phantom_subject(tmp / "input", subject, n, hr_masks=hr_masks)
        record = upscale_to_folder(staged_subject, tmp / "sr", opts)
        subject_dir = out / "input" / staged_subject.name
        record.update(input=str(subject_dir.resolve()), output=str((out / "sr").resolve()))
        (tmp / "sr" / "run.json").write_text(json.dumps(record, indent=2, default=str))
        result = evaluate_folders(tmp / "sr", staged_subject / "truth", staged_subject)
        (tmp / "metrics.json").write_text(strict_json(result, indent=2))
    return DemoResult(subject.subject_id, n, record, result)


def print_summary(demo: DemoResult, out: Path, backend: str) -> None:
    """The demo's table (zero-filled against the sampler: NFE, time, PSNR, SSIM, NRMSE) and where its files are."""
    from rich.table import Table

    record, n = demo.record, demo.n
    table = Table(title=f"{demo.subject_id}, s = {64 / n:.2f}, mask from {record['mask_source']}, backend {backend}")
    for col in ("method", "NFE", "s / map", "PSNR (dB)", "SSIM", "NRMSE", "coverage"):
        table.add_column(col, justify="right")
    overall = demo.metrics["overall"]
    if "zero-filled" in overall:
        zf = overall["zero-filled"]
        table.add_row("zero-filled", "0", "-", f"{zf['psnr']:.2f}", f"{zf['ssim']:.3f}", f"{zf['nrmse']:.3f}", "-")
    pr = overall["prediction"]
    table.add_row(
        record["sampler"]["name"],
        str(record["nfe"]),
        f"{record['seconds_per_map']:.3f}",
        f"{pr['psnr']:.2f}",
        f"{pr['ssim']:.3f}",
        f"{pr['nrmse']:.3f}",
        f"{pr['coverage']:.3f}",
    )
    console.print(table)
    console.print(
        f"report picture: {out / 'sr' / 'report.png'}; maps: {out / 'sr' / 'concs'}; metrics: {out / 'metrics.json'}"
    )
