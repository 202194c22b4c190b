"""`ftddm-trt export`: a model set to ONNX, fp32 (``export.onnx_export``) or with int8 UNets (``export.int8``).

An int8 export's quality is measured here, where the sampler lives: ``int8_parity`` runs the default
sampler of ``upscale`` (FTDDM + DPM-Solver++ 20, tau_f 0, data consistency as ``upscale`` sets it) on held-out
maps of the calibration source with the fp32 and the int8 graphs on ONNX Runtime, from the same seeds, and
scores both against the truth (PSNR in dB inside the truth's quality mask, file units).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ftddm_trt.constants import HR_SIZE, USER_DEFAULT_TAU_F
from ftddm_trt.data.examples import SlicePool
from ftddm_trt.engine.onnxruntime_backend import OnnxRuntimeBackend
from ftddm_trt.engine.pipeline import SamplerSpec, consistency_for, sample_images
from ftddm_trt.evaluation.quality import example_tensors
from ftddm_trt.evaluation.volumes import MIN_VOXELS, map_metrics
from ftddm_trt.export.int8 import CalibrationSettings, Int8Error, Int8Export, export_int8
from ftddm_trt.export.onnx_export import export_model_set
from ftddm_trt.models.model_set import ModelSet
from ftddm_trt.workflows.console import console

#: (acquisition size N, mask protocol) of the parity cells: s = 8, 4, 2, both protocols.
PARITY_CELLS: tuple[tuple[int, str], ...] = ((8, "hr"), (16, "hr"), (32, "hr"), (8, "lr"), (16, "lr"), (32, "lr"))


def parity_maps(pool: SlicePool, n_maps: int, seed: int = 0) -> np.ndarray:
    """A fixed random choice of ``n_maps`` maps of ``pool`` with enough quality-mask voxels to be scored."""
    ok = np.flatnonzero(pool.masks.reshape(len(pool), -1).sum(1) >= 4 * MIN_VOXELS)
    if ok.size == 0:
        ok = np.arange(len(pool))
    return np.sort(np.random.default_rng(seed).choice(ok, size=min(n_maps, ok.size), replace=False))


def int8_parity(fp32_dir: Path, int8_dir: Path, pool: SlicePool, n_maps: int = 8,
                cells: tuple[tuple[int, str], ...] = PARITY_CELLS, seed: int = 0, batch_size: int = 8,
                threads: int | None = None) -> dict[str, Any]:
    """PSNR (dB) of the default sampler with the fp32 and the int8 export on ``n_maps`` maps of ``pool`` per
    cell, and their difference (int8 - fp32: negative is a loss). Int8Error if the int8 output is not finite."""
    spec = SamplerSpec(tau_f=USER_DEFAULT_TAU_F)
    idx = parity_maps(pool, n_maps, seed)
    rows = []
    with OnnxRuntimeBackend(fp32_dir, threads=threads) as fp32, OnnxRuntimeBackend(int8_dir, threads=threads) as int8:
        for n, protocol in cells:
            y, s, scale, truth, region, _ = example_tensors(pool, idx, n, protocol)
            cell_spec = consistency_for(spec, "auto", fine_mask=protocol == "hr")
            psnr = {}
            for label, backend in (("fp32", fp32), ("int8", int8)):
                x, _ = sample_images(backend, cell_spec, y, s, batch_size=batch_size, seed=seed)
                if not bool(np.isfinite(x.numpy()).all()):
                    raise Int8Error(f"the {label} export gives non-finite maps at N = {n} ({protocol})")
                pred = np.clip(x[:, 0].numpy() * scale[:, None, None], 0.0, None)
                psnr[label] = map_metrics(pred, truth, region)["psnr"]
            diff = psnr["int8"] - psnr["fp32"]
            rows.append({"n": n, "s": HR_SIZE / n, "protocol": protocol, "maps": int(np.isfinite(diff).sum()),
                         "psnr_fp32_db": float(np.nanmean(psnr["fp32"])),
                         "psnr_int8_db": float(np.nanmean(psnr["int8"])),
                         "difference_db": float(np.nanmean(diff)), "worst_map_difference_db": float(np.nanmin(diff))})
    diffs = [r["difference_db"] for r in rows]
    return {"sampler": spec.to_dict(), "data_consistency": "auto (on for hr, off for lr)", "seed": seed,
            "maps_per_cell": int(idx.size), "cells": rows, "mean_difference_db": float(np.mean(diffs)),
            "worst_cell_difference_db": float(np.min(diffs))}


def export_onnx(model: Path | None, out: Path, ttrunc: int | None = None, force: bool = False, int8: bool = False,
                calibration_data: Path | None = None, log: Callable[[str], None] = console.print,
                calibration: CalibrationSettings | None = None) -> dict[str, Any]:
    """Export ``model`` (default: the shipped one) into ``out``: fp32, or with ``int8`` UNets calibrated on
    ``calibration_data`` (a training folder; default: phantoms), the dB parity measured and recorded.
    Returns the manifest. Raises what the exporters raise (ParityError, Int8Error, OutputError, ...)."""
    if calibration_data is not None and not int8:
        raise ValueError("--calibration-data calibrates an int8 export: give --int8 with it")
    models = ModelSet.open(model, ttrunc)
    if not int8:
        return export_model_set(models, out, force=force, log=log, flow_ttrunc=ttrunc)
    settings = calibration or CalibrationSettings(data=calibration_data)
    return export_int8(models, out, Int8Export(calibration=settings, parity=int8_parity), force=force, log=log,
                       flow_ttrunc=ttrunc)
