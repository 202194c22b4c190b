"""Constants shared by every part of ftddm-trt (data, models, diffusion, engines)."""

from __future__ import annotations

#: The 7 metabolites of the paper, in channel order everywhere (files, arrays, reports).
METABOLITES: tuple[str, ...] = ("tCr", "tCho", "NAA", "Glu", "Ins", "Gln", "Gly")

#: Super-resolution matrix size (pixels per side); about 3.4 mm pixels on a 220 mm FOV.
HR_SIZE: int = 64
FOV_MM: float = 220.0

#: Acquired low-resolution matrix sizes N (N x N in-plane) that files may hold, s = HR_SIZE / N.
LR_SIZES: tuple[int, ...] = tuple(range(2, 33, 2))
#: The sizes training draws from (s = 2 to 8). Below them a model extrapolates its scale conditioning:
#: ``upscale`` checks such inputs against the model's measured breakpoint (``data.breakpoint``).
TRAINED_LR_SIZES: tuple[int, ...] = tuple(range(8, 33, 2))

#: Diffusion chain length and the default truncation point of FTDDM.
T_DIFFUSION: int = 1000
T_TRUNC: int = 100

#: Flow temperature ``upscale`` uses unless told otherwise: FTDDM + DPM-Solver++ from the flow's mode.
#: The ODE solver adds no noise, so the output is the deterministic, highest-fidelity estimate;
#: ``--tau-f 0.9`` (the paper's temperature) draws samples, e.g. for ``--samples K`` uncertainty maps.
USER_DEFAULT_TAU_F: float = 0.0

#: The qc consistency weight recorded when neither ``--qc-consistency`` nor the model's fine-mask estimator
#: gives one (``engine.pipeline.qc_step_weight``); without an estimator there is no qc step to weigh.
QC_CONSISTENCY_WEIGHT: float = 0.2

#: Training-loss weight of the voxels of M outside the truth's quality mask (``training.objectives.loss_weight``;
#: 1 is the paper's loss over all of M). In ``lr`` those voxels hold an extension of the truth the
#: condition does not determine, and at full weight they teach an upward level bias (docs/architecture.md). The shipped
#: UNet and ``finetune`` use this; a training run saved before the option existed resumes with 1.
MARGIN_WEIGHT: float = 0.1

#: Quality-filtering thresholds of the paper (FSL-MRS qc maps).
SNR_MIN: float = 2.5
FWHM_MAX_PPM: float = 0.15

#: Condition channels y = {zero-filled LR, mask M, T1, FLAIR}; the UNet also gets x_t.
COND_CHANNELS: int = 4


def scale_for(n: int) -> float:
    """Upscaling factor s = 64 / N for an N x N acquisition."""
    if n not in LR_SIZES:
        raise ValueError(f"in-plane size {n} is not one of {LR_SIZES}")
    return HR_SIZE / n

#: Input channels of the fine-mask estimator (``data.masks.fine_mask_features``, ``models.fine_mask``).
FINE_MASK_FEATURES: int = 8
#: Version of those features: 2 reads the qc maps relative to their own median (any qc convention);
#: an estimator saved with version 1 read absolute SNR in one convention and is not used.
FINE_MASK_FEATURES_VERSION: int = 2
