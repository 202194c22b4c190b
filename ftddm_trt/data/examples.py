"""Network-ready examples (truth, condition, mask, s) from phantom subjects, for training and checks.

One training example is one metabolite map of one slice. A batch is built the way the paper trains:
random rotation, flip and translation of the 64x64 truth (applied jointly to the map, its quality mask,
T1, FLAIR and the qc maps), an upscaling factor s drawn uniformly from the 13 acquisition sizes,
the low resolution made by k-space truncation, and the mask M of one of the two protocols
(``hr``: the 64x64 quality mask, ``lr``: the mask a user has, see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ftddm_trt.constants import HR_SIZE, TRAINED_LR_SIZES
from ftddm_trt.data.kspace import kspace_truncate
from ftddm_trt.data.masks import fill_outside, lr_support_mask
from ftddm_trt.data.normalize import normalize_anatomy, normalize_maps
from ftddm_trt.data.phantom import PhantomSubject

PROTOCOLS = ("hr", "lr")


@dataclass(frozen=True)
class Batch:
    """Network-ready tensors (NCHW float32) of B examples.

    x0: (B,1,64,64) normalized truth, zero outside M.
    y: (B,4,64,64) condition [zero-filled LR, M, T1, FLAIR].
    mask: (B,1,64,64) the mask M (0/1), also where diffusion noise lives.
    s: (B,) upscaling factors.
    scored: (B,1,64,64) the voxels of M inside the truth's quality mask (0/1): those a map is scored on.
        ``hr``: all of M. ``lr``: M less its dilated margin and its low-SNR holes, where the target is
        the ``fill_outside`` extension (see prepare_example).
    """

    x0: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    s: torch.Tensor
    scored: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with every tensor moved to ``device``."""
        return Batch(*(getattr(self, f).to(device) for f in ("x0", "y", "mask", "s", "scored")))


@dataclass(frozen=True)
class SlicePool:
    """All (slice, metabolite) examples of a set of subjects, as stacked arrays.

    maps, masks, snr, fwhm: (K, 64, 64); t1, flair: (K, 64, 64) normalized to [0, 1].
    """

    maps: np.ndarray
    masks: np.ndarray
    snr: np.ndarray
    fwhm: np.ndarray
    t1: np.ndarray
    flair: np.ndarray

    @classmethod
    def from_subjects(cls, subjects: list[PhantomSubject]) -> "SlicePool":
        """Every (slice, metabolite) of ``subjects``, stacked: ``K = sum(Z * C)`` examples, T1 and FLAIR
        normalized per subject volume and repeated for each metabolite."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("maps", "masks", "snr", "fwhm", "t1", "flair")}
        for subj in subjects:
            z, c = subj.maps.shape[:2]
            parts["maps"].append(subj.maps.reshape(z * c, HR_SIZE, HR_SIZE))
            parts["masks"].append(subj.masks.reshape(z * c, HR_SIZE, HR_SIZE))
            parts["snr"].append(subj.snr.reshape(z * c, HR_SIZE, HR_SIZE))
            parts["fwhm"].append(subj.fwhm.reshape(z * c, HR_SIZE, HR_SIZE))
            for name, vol in (("t1", subj.t1), ("flair", subj.flair)):
                parts[name].append(np.repeat(normalize_anatomy(vol), c, axis=0))
        return cls(**{k: np.concatenate(v).astype(np.float32) for k, v in parts.items()})

    def __len__(self) -> int:
        return self.maps.shape[0]


def augment(stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random rotation (+-15 deg), flip and translation (+-4 px) of a (C,64,64) stack.

    Channel 1 (the quality mask) is resampled nearest-neighbour, the others linearly.
    """
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    flip = rng.random() < 0.5
    shift = rng.uniform(-4.0, 4.0, size=2)
    c, s_ = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s_], [s_, c]])
    if flip:
        rot = rot @ np.diag([1.0, -1.0])
    centre = np.array([(HR_SIZE - 1) / 2.0] * 2)
    offset = centre - rot @ (centre + shift)
    out = np.empty_like(stack)
    for ch in range(stack.shape[0]):
        out[ch] = ndimage.affine_transform(
            stack[ch], rot, offset=offset, order=0 if ch == 1 else 1, mode="constant", cval=0.0
        )
    return out


@dataclass(frozen=True)
class Example:
    """One prepared map. x0: (64,64) normalized target cut by M (hr: the truth; lr: the truth extended outside its
    quality mask, see prepare_example); y: (4,64,64); mask: (64,64) float 0/1;
    scale: normalization factor (file units); truth, truth_mask: the unnormalized 64x64 truth and its
    quality mask; zero_filled: (64,64) zero-filled LR in file units."""

    x0: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    scale: float
    truth: np.ndarray
    truth_mask: np.ndarray
    zero_filled: np.ndarray


def prepare_example(stack: np.ndarray, n: int, protocol: str) -> Example:
    """Condition and target from a (6,64,64) stack [map, quality mask, T1, FLAIR, SNR, FWHM]."""
    truth_mask = stack[1] > 0.5
    truth = stack[0] * truth_mask
    lr, zero_filled = kspace_truncate(truth, n)
    if protocol == "hr":
        mask = truth_mask
    elif protocol == "lr":
        mask = lr_support_mask(lr, HR_SIZE)
    else:
        raise ValueError(f"unknown mask protocol {protocol!r}; expected one of {PROTOCOLS}")
    maskf = mask.astype(np.float32)
    zf_norm, scale = normalize_maps(zero_filled, mask)
    # hr: the quality-filtered truth (zero outside M = the quality mask). lr: M is a coarse, dilated
    # support; voxels of M outside the fine quality mask are never scored, so the target there is the
    # map extended smoothly (masks.fill_outside) rather than zeros the network cannot place.
    target = truth if protocol == "hr" else fill_outside(truth, truth_mask)
    x0 = (target / scale) * maskf
    y = np.stack([zf_norm, maskf, stack[2], stack[3]]).astype(np.float32)
    return Example(x0=x0.astype(np.float32), y=y, mask=maskf, scale=float(scale), truth=truth.astype(np.float32),
                   truth_mask=truth_mask, zero_filled=zero_filled.astype(np.float32))


def pool_stack(pool: SlicePool, index: int) -> np.ndarray:
    """The (6,64,64) stack of example ``index``: map, mask, T1, FLAIR, SNR, FWHM."""
    return np.stack(
        [pool.maps[index], pool.masks[index], pool.t1[index], pool.flair[index], pool.snr[index], pool.fwhm[index]]
    )


def make_example(
    pool: SlicePool,
    index: int,
    n: int,
    protocol: str,
    rng: np.random.Generator | None,
) -> Example:
    """One training example (prepare_example's), augmented when rng is given."""
    stack = pool_stack(pool, index)
    if rng is not None:
        stack = augment(stack, rng)
    return prepare_example(stack, n, protocol)


def collate(examples: list[Example], sizes: list[int]) -> Batch:
    """One ``Batch`` of ``examples``, example ``k`` acquired at ``sizes[k] x sizes[k]``: x0, mask and scored
    ``(B, 1, 64, 64)``, y ``(B, 4, 64, 64)``, s ``(B,)`` = ``64 / n`` (float32 tensors)."""
    def stacked(values: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(values).astype(np.float32))

    mask = stacked([e.mask for e in examples])[:, None]
    return Batch(x0=stacked([e.x0 for e in examples])[:, None], y=stacked([e.y for e in examples]), mask=mask,
                 s=torch.tensor([HR_SIZE / n for n in sizes], dtype=torch.float32),
                 scored=mask * stacked([e.truth_mask for e in examples])[:, None])


def random_batch(
    pool: SlicePool, batch_size: int, rng: np.random.Generator, lr_protocol_fraction: float = 0.5
) -> Batch:
    """A training batch: random examples, augmentation, s uniform over TRAINED_LR_SIZES, mixed mask protocols."""
    idx = rng.integers(0, len(pool), size=batch_size)
    sizes = [int(rng.choice(TRAINED_LR_SIZES)) for _ in range(batch_size)]
    protocols = ["lr" if rng.random() < lr_protocol_fraction else "hr" for _ in range(batch_size)]
    examples = [make_example(pool, int(i), n, p, rng) for i, n, p in zip(idx, sizes, protocols)]
    return collate(examples, sizes)


def fixed_batches(pool: SlicePool, n_examples: int, batch_size: int, seed: int = 1234) -> list[Batch]:
    """Deterministic, unaugmented validation batches (both protocols, all scales in turn)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=min(n_examples, len(pool)), replace=False)
    batches = []
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        sizes = [TRAINED_LR_SIZES[(start + k) % len(TRAINED_LR_SIZES)] for k in range(len(chunk))]
        protocols = [PROTOCOLS[(start + k) % 2] for k in range(len(chunk))]
        examples = [make_example(pool, int(i), n, p, None) for i, n, p in zip(chunk, sizes, protocols)]
        batches.append(collate(examples, sizes))
    return batches
