"""The distilled sampler: a few deterministic DDIM steps (Song et al. 2021, eq. 12 with sigma = 0) with a
student UNet trained to land, in those steps, where the teacher's whole sampler lands.

From ``x_{t_k}`` the student's noise estimate gives ``x0_k = (x_{t_k} - sqrt(1 - gamma_{t_k}) eps) / sqrt(gamma_{t_k})``
and the next state ``x_{t_{k+1}} = sqrt(gamma_{t_{k+1}}) x0_k + sqrt(1 - gamma_{t_{k+1}}) eps``; the last step
returns ``x0_k``. With one step this is the student's x0 estimate at ``Ttrunc``. The function keeps the
autograd graph (no ``torch.no_grad`` inside), so training unrolls exactly the chain the sampler runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..schedule import DiscreteSchedule
from .base import EpsFn, ProgressFn, SampleResult, masked_eps

__all__ = ["MAX_DISTILLED_STEPS", "distilled_sample", "distilled_timesteps"]

#: The distilled sampler's step counts: 1 to 3 UNet evaluations after the flow.
MAX_DISTILLED_STEPS = 3


def distilled_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``t_start`` down, descending: ``t_start * (steps - k) / steps``
    rounded, k = 0..steps-1 (``(100, 2) -> [100, 50]``, ``(100, 3) -> [100, 67, 33]``)."""
    if not 1 <= steps <= t_start:
        raise ValueError(f"cannot take {steps} steps from t = {t_start}")
    ts = [max(1, round(t_start * (steps - k) / steps)) for k in range(steps)]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{steps} steps from t = {t_start} do not give distinct timesteps")
    return ts


def distilled_sample(
    eps_fn: EpsFn,
    x_start: Tensor,
    mask: Tensor | None,
    schedule: DiscreteSchedule,
    timesteps: Sequence[int],
    clip: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
) -> SampleResult:
    """Deterministic DDIM over ``timesteps`` (descending, the first is ``x_start``'s timestep).

    x_start: (B,1,H,W) state at ``timesteps[0]`` (zero outside ``mask``); mask: (B,1,H,W) 0/1 or None.
    ``clip``: clamp each x0 estimate to (lo, hi) (normalized units), as the other samplers do.
    Returns the x0 estimate (zero outside the mask) and NFE = ``len(timesteps)``.
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 1:
        raise ValueError(f"timesteps must be a non-empty strictly descending list of t >= 1, got {ts}")
    x = x_start
    x0 = x_start
    for k, t in enumerate(ts):
        eps = masked_eps(eps_fn, x, t, mask)
        x0 = schedule.predict_x0(x, torch.full((x.shape[0],), t, dtype=torch.long), eps)
        if clip is not None:
            x0 = x0.clamp(*clip)
        if mask is not None:
            x0 = x0 * mask
        if k + 1 < len(ts):
            g = schedule.gammas[ts[k + 1]].to(dtype=x.dtype, device=x.device)
            x = g.sqrt() * x0 + (1.0 - g).sqrt() * eps
        if progress is not None:
            progress(k, len(ts))
    return SampleResult(x0=x0, nfe=len(ts))
