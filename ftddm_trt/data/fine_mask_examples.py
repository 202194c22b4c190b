"""The fine-mask estimator's examples (``models.fine_mask``): what an ``lr`` user has, and the truth's mask.

Each example is one map acquired at an N of ``TRAINED_LR_SIZES``: its features (``data.masks.fine_mask_features``)
and the truth's 64x64 quality mask as the target, inside M. ``training.fine_mask`` trains on them and
``evaluation.fine_mask`` scores the estimator on them; ``dice`` compares masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ftddm_trt.data.examples import SlicePool, augment, pool_stack, prepare_example
from ftddm_trt.data.masks import fine_mask_features
from ftddm_trt.data.qc_conventions import CONVENTIONS, QcConvention, acquired_qc, get_convention

__all__ = ["FineMaskExample", "TRAINING_CONVENTIONS", "dice", "fine_mask_batch", "fine_mask_example"]


@dataclass(frozen=True)
class FineMaskExample:
    """features: (8, 64, 64); target: (64, 64) the truth's quality mask (0/1); support: (64, 64) M (0/1)."""

    features: np.ndarray
    target: np.ndarray
    support: np.ndarray


#: qc conventions the estimator trains over (``data.qc_conventions``; thresholds stay the paper's).
TRAINING_CONVENTIONS: tuple[QcConvention, ...] = tuple(c for c in CONVENTIONS.values() if c.name != "strict-thresholds")


def fine_mask_example(stack: np.ndarray, n: int, convention: QcConvention) -> FineMaskExample:
    """The estimator's input and target for a (6, 64, 64) stack [map, quality mask, T1, FLAIR, SNR, FWHM]
    acquired at ``n x n`` (the ``lr`` condition of ``data.examples.prepare_example``), its qc maps written
    in ``convention``."""
    ex = prepare_example(stack, n, "lr")
    qc = acquired_qc(stack[4], stack[5], n, convention)
    feats = fine_mask_features(ex.y[0], ex.mask, ex.y[2], ex.y[3], n, *(qc or (None, None)))
    return FineMaskExample(features=feats, target=ex.truth_mask.astype(np.float32), support=ex.mask)


def fine_mask_batch(pool: SlicePool, indices: np.ndarray, sizes: list[int], rng: np.random.Generator | None,
                    convention: QcConvention | str = "ours") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (B,8,64,64), target (B,1,64,64), support (B,1,64,64)) of maps ``indices`` at ``sizes``;
    with ``rng``, augmented and each map's qc convention drawn from ``TRAINING_CONVENTIONS``, else all
    written in ``convention``."""
    fixed = get_convention(convention) if isinstance(convention, str) else convention
    exs = []
    for i, n in zip(indices, sizes):
        stack = pool_stack(pool, int(i))
        if rng is not None:
            stack = augment(stack, rng)
            conv = TRAINING_CONVENTIONS[int(rng.integers(len(TRAINING_CONVENTIONS)))]
        else:
            conv = fixed
        exs.append(fine_mask_example(stack, int(n), conv))
    return (torch.from_numpy(np.stack([e.features for e in exs])),
            torch.from_numpy(np.stack([e.target for e in exs]))[:, None],
            torch.from_numpy(np.stack([e.support for e in exs]).astype(np.float32))[:, None])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice overlap of two stacks of boolean masks (..., H, W); 1 where both are empty."""
    a = np.asarray(a, bool).reshape(-1, *np.shape(a)[-2:])
    b = np.asarray(b, bool).reshape(-1, *np.shape(b)[-2:])
    inter = (a & b).sum(axis=(1, 2))
    total = a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))
    return float(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))
