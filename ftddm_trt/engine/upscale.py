"""Super-resolve one subject volume: condition from the files, the pipeline over a backend, units back.

This is the whole-volume path behind ``ftddm-trt upscale`` and ``demo``; it reads nothing and writes
nothing itself (``data.nifti`` does the files), so it serves the CLI, benchmarks and tests alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ftddm_trt.constants import HR_SIZE
from ftddm_trt.data.kspace import zero_fill
from ftddm_trt.data.masks import fine_mask_features
from ftddm_trt.data.nifti.read import SubjectInput
from ftddm_trt.data.normalize import denormalize, normalize_anatomy, normalize_maps
from ftddm_trt.engine.backend import Backend
from ftddm_trt.engine.pipeline import SamplerSpec, qc_consistency, qc_consistency_applies, sample_images
from ftddm_trt.integrity import require_finite
from ftddm_trt.models.fine_mask import FineMaskNet


@dataclass
class Condition:
    """Network inputs for every (slice, metabolite) image of a volume, in (z, c) row-major order.

    y: (Z*C, 4, 64, 64); s: (Z*C,); scale: (Z, C) normalization factors (file units);
    zero_filled: (Z, C, 64, 64) in file units (the zero-filled baseline); mask: (Z, C, 64, 64) bool;
    qc_fine_mask: (Z*C, 1, 64, 64) float 0/1 estimate of the fine quality mask when M came from the acquired
    grid (``lr``) and the model has a fine-mask estimator (``models.fine_mask``) that reads the current,
    convention-free features; else None. ``qc_mask_source`` says which (``"learned"`` or None) and
    ``qc_mask_note`` why there is none.
    """

    y: torch.Tensor
    s: torch.Tensor
    scale: np.ndarray
    zero_filled: np.ndarray
    mask: np.ndarray
    anatomy: str
    qc_fine_mask: torch.Tensor | None = None
    qc_mask_source: str | None = None
    qc_mask_note: str | None = None


def build_condition(subject: SubjectInput, fine_mask_net: FineMaskNet | None = None) -> Condition:
    """Zero-fill the LR maps, normalize as in training, stack [LR, M, T1, FLAIR]; with qc maps, estimate
    the fine quality mask (by ``fine_mask_net`` when given)."""
    z, c = subject.lr.shape[:2]
    zero_filled = zero_fill(subject.lr, HR_SIZE).astype(np.float32)
    mask = subject.mask.astype(bool)
    zf_norm, scale = normalize_maps(zero_filled, mask)
    anatomy = []
    for vol in (subject.t1, subject.flair):
        anatomy.append(np.zeros((z, HR_SIZE, HR_SIZE), np.float32) if vol is None else normalize_anatomy(vol))
    t1 = np.broadcast_to(anatomy[0][:, None], (z, c, HR_SIZE, HR_SIZE))
    flair = np.broadcast_to(anatomy[1][:, None], (z, c, HR_SIZE, HR_SIZE))
    y = np.stack([zf_norm, mask.astype(np.float32), t1, flair], axis=2).reshape(z * c, 4, HR_SIZE, HR_SIZE)
    s = np.full(z * c, HR_SIZE / subject.n, dtype=np.float32)
    have = [n for n, v in (("t1", subject.t1), ("flair", subject.flair)) if v is not None]
    qc_fine, source, note = None, None, None
    if subject.fine_mask:
        note = "M is a fine quality mask: full data consistency instead"
    elif fine_mask_net is None:
        note = "the model has no fine-mask estimator"
    elif not fine_mask_net.config.current_features:
        note = "the model's fine-mask estimator reads absolute qc values of one convention: not used"
    else:
        feats = fine_mask_features(zf_norm, mask, t1, flair, subject.n, subject.snr, subject.fwhm)
        qc_fine = fine_mask_net.mask(torch.from_numpy(feats.reshape(z * c, -1, HR_SIZE, HR_SIZE)))
        source = "learned"
    return Condition(
        y=torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
        s=torch.from_numpy(s),
        scale=np.asarray(scale, np.float32),
        zero_filled=zero_filled,
        mask=mask,
        anatomy="+".join(have) if have else "none (zeros)",
        qc_fine_mask=qc_fine,
        qc_mask_source=source,
        qc_mask_note=note,
    )


@dataclass
class UpscaleResult:
    """maps: (Z, C, 64, 64) in the input's units (mean over samples); sd: same shape or None."""

    maps: np.ndarray
    sd: np.ndarray | None
    condition: Condition
    nfe: int
    seconds: float
    seconds_per_slice: float
    samples: int
    qc_consistency_applied: bool = False
    #: maps (over all samples) whose qc step was kept by the do-no-harm check, and how many it ran on
    qc_consistency_kept: int = 0
    qc_consistency_tried: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def upscale_subject(
    subject: SubjectInput,
    backend: Backend,
    spec: SamplerSpec,
    batch_size: int = 16,
    seed: int = 0,
    samples: int = 1,
    progress: Callable[[int, int], None] | None = None,
    server_loop: bool = False,
    qc_weight: float = 0.0,
    fine_mask_net: FineMaskNet | None = None,
) -> UpscaleResult:
    """Run ``spec`` over every image of the volume, ``samples`` times (K > 1: mean and per-voxel SD).

    ``progress(done, total)`` counts images over all samples. Negative concentrations are clipped
    to zero; voxels outside the mask M are zero. NaN or inf in any output raises NonFiniteOutputError.
    ``server_loop`` runs each batch's whole sampling loop on the server (a backend with ``sample_on_server``, i.e.
    Triton's ftddm_sampler). ``qc_weight`` > 0: when M came from the acquired grid and data consistency is off, each
    output goes through ``pipeline.qc_consistency`` with that weight through ``fine_mask_net``'s estimate of the fine
    mask, kept per map only where it agrees better with the acquired band (``UpscaleResult.qc_consistency_applied`` says
    whether it ran, ``qc_consistency_kept`` / ``_tried`` on how many maps it was kept).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    batch_sampler = None
    if server_loop:
        if not hasattr(backend, "sample_on_server"):
            raise ValueError(f"backend {backend.name!r} has no server-side loop (only triton has)")
        batch_sampler = lambda yb, sb, bseed: backend.sample_on_server(yb, sb, spec, bseed)  # noqa: E731
    t0 = time.perf_counter()
    cond = build_condition(subject, fine_mask_net)
    z, c = cond.mask.shape[:2]
    k = z * c
    t_cond = time.perf_counter() - t0
    use_qc = qc_consistency_applies(spec, cond.qc_fine_mask, qc_weight)
    kept = tried = 0
    draws = []
    for i in range(samples):
        done = i * k

        def tick(n: int, done: int = done) -> None:
            if progress is not None:
                progress(done + n, samples * k)

        x, nfe = sample_images(backend, spec, cond.y, cond.s, batch_size=batch_size, seed=seed + i, progress=tick,
                               batch_sampler=batch_sampler)
        if use_qc:
            x, applied = qc_consistency(x, cond.y, cond.s, cond.qc_fine_mask, qc_weight)
            kept, tried = kept + int(applied.sum()), tried + int(applied.numel())
        x = x.numpy().reshape(z, c, HR_SIZE, HR_SIZE)
        require_finite(x, f"the {spec.name} output on backend {backend.name} (sample {i + 1})")
        draws.append(np.clip(denormalize(x, cond.scale), 0.0, None))
    stack = np.stack(draws)
    seconds = time.perf_counter() - t0
    return UpscaleResult(
        maps=stack.mean(0).astype(np.float32),
        sd=stack.std(0, ddof=1).astype(np.float32) if samples > 1 else None,
        condition=cond,
        nfe=nfe,
        seconds=seconds,
        seconds_per_slice=(seconds - t_cond) / (samples * k),
        samples=samples,
        qc_consistency_applied=use_qc,
        qc_consistency_kept=kept,
        qc_consistency_tried=tried,
        timings={"condition_s": t_cond, "sampling_s": seconds - t_cond},
    )
