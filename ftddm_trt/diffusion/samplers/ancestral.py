"""Ancestral (DDPM) sampling, paper eq. 12 / Algorithm 1, for full, respaced and truncated chains."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..schedule import DiscreteSchedule, RespacedSchedule
from .base import EpsFn, ProgressFn, SampleResult, masked_eps, randn_on

__all__ = [
    "ancestral_sample",
    "draw_ancestral_noise",
    "ddpm_timesteps",
    "respaced_timesteps",
    "truncated_timesteps",
]


def ddpm_timesteps(T: int) -> list[int]:
    """The full chain ``[T, T-1, ..., 1]`` (NFE = T)."""
    return list(range(T, 0, -1))


def truncated_timesteps(t_trunc: int) -> list[int]:
    """The truncated chain of FTDDM ``[Ttrunc, ..., 1]`` (Algorithm 1; NFE = Ttrunc, plus one flow pass)."""
    return list(range(t_trunc, 0, -1))


def respaced_timesteps(T: int, n: int) -> list[int]:
    """``n`` evenly spaced steps of a ``T``-step chain, descending, 1-based.

    Exactly improved-diffusion's ``space_timesteps(T, [n])`` (one section: ``round(i * (T-1)/(n-1))`` for
    ``i = 0..n-1``, accumulated as there, Python's rounding), shifted by +1 to our 1-based timesteps, so the
    chain always contains ``T`` and ``1``. ``respaced_timesteps(1000, 100) = [1000, 991, ..., 10, 1]``.
    Also serves a respaced *truncated* chain: ``respaced_timesteps(Ttrunc, n)``.
    """
    if not 1 <= n <= T:
        raise ValueError(f"cannot take {n} steps out of {T}")
    frac_stride = 1.0 if n <= 1 else (T - 1) / (n - 1)
    cur_idx = 0.0
    taken: list[int] = []
    for _ in range(n):
        taken.append(round(cur_idx) + 1)
        cur_idx += frac_stride
    return sorted(set(taken), reverse=True)


def _check_timesteps(timesteps: Sequence[int], T: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be strictly descending")
    if ts[-1] < 1 or ts[0] > T:
        raise ValueError(f"timesteps must lie in [1, {T}]")
    return ts


def draw_ancestral_noise(
    n_steps: int, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """The sampling noise ``z`` that :func:`ancestral_sample` would draw from ``generator`` for an
    ``n_steps`` chain: ``n_steps - 1`` unit normals of ``like``'s shape, drawn one step after another, stacked
    to ``(n_steps - 1, *like.shape)``. Passing the result as ``noise=`` gives the same sample as passing the
    generator (useful for CUDA graphs and for comparing backends on one noise draw)."""
    draws = [randn_on(generator, like.shape, like.device, like.dtype) for _ in range(n_steps - 1)]
    if not draws:
        return torch.empty((0, *like.shape), device=like.device, dtype=like.dtype)
    return torch.stack(draws)


@torch.no_grad()
def ancestral_sample(
    eps_fn: EpsFn,
    x_start: Tensor,
    mask: Tensor | None,
    schedule: DiscreteSchedule,
    timesteps: Sequence[int],
    tau_d: float = 0.9,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = None,
    noise: Tensor | None = None,
    progress: ProgressFn | None = None,
) -> SampleResult:
    """Ancestral sampling of paper eq. 12 / Algorithm 1, on the chain ``timesteps`` (strictly descending).

    Writing the kept steps ``t_K > ... > t_1`` (``t_0 = 0``) and the respaced constants
    ``gamma'_k = gamma_{t_k}``, ``beta'_k = 1 - gamma'_k / gamma'_{k-1}``, ``alpha'_k = 1 - beta'_k``
    (improved-diffusion's respacing; for consecutive steps these are the original ``beta_t``), each step is::

        x_{k-1} = 1/sqrt(alpha'_k) * (x_k - beta'_k / sqrt(1 - gamma'_k) * M * eps_fn(x_k, t_k))
                  + sigma'_k * tau_d * M * z_k,        z_k ~ N(0, I),  z_1 = 0 (no noise at the last step)

    with the "fixed small" ``sigma'_k^2 = (1 - gamma'_{k-1}) / (1 - gamma'_k) * beta'_k``.

    ``tau_d`` is a **standard deviation** factor: it multiplies a unit normal (as the authors' code does),
    i.e. ``z ~ N(0, tau_d^2 I)``; the paper's text writes ``N(0, tau_d I)``. ``tau_d = 1`` is plain DDPM.

    One function serves the three chains of the paper:

    - DDPM full: ``timesteps = ddpm_timesteps(T)``, ``x_start = initial_noise(mask)``; NFE = T.
    - DDPM respaced: ``timesteps = respaced_timesteps(T, n)``, ``x_start = initial_noise(mask)``; NFE = n.
    - FTDDM truncated: ``timesteps = truncated_timesteps(Ttrunc)``, ``x_start`` = the flow output
      ``x_Ttrunc``; NFE = Ttrunc (+ 1 flow pass, counted by the pipeline).

    Args:
        eps_fn: noise predictor, fed the original 1-based ``t`` (float32 ``(B,)``).
        x_start: ``x_{t_K}``, ``(B, 1, H, W)``; the result has its dtype and device.
        mask: the quality mask M (broadcastable to ``x_start``), or ``None`` for no mask. The prediction
            and the sampling noise are multiplied by M, so a zero background stays exactly zero.
        schedule: the schedule whose timesteps ``timesteps`` refers to (normally :class:`CosineSchedule`;
            with a :class:`RespacedSchedule`, its ``timestep_map`` gives what the network is fed).
        timesteps: strictly descending timesteps, e.g. ``[100, ..., 1]``.
        tau_d: temperature on the sampling noise (std factor), default 0.9 as the paper.
        generator: ``torch.Generator`` for the sampling noise, on any device: each draw happens on the
            generator's device and is then moved to ``x_start``'s (:func:`randn_on`), so a CPU generator
            serves a CUDA chain and gives the same noise as on the CPU; one draw of ``x_start``'s shape
            per step except the last (see :func:`draw_ancestral_noise`).
        clip: optional ``(lo, hi)``: clamp the predicted x0 and use the posterior mean instead of the
            (algebraically identical) eq. 12 form.
        noise: optional pre-drawn noise ``(n_steps - 1 or n_steps, B, 1, H, W)`` used instead of the
            generator; ``noise[i]`` is used at step ``i`` (0-based, ``i < n_steps - 1``).
        progress: optional ``progress(step_index, n_steps)`` called after each step.

    Returns:
        ``SampleResult(x0, nfe=len(timesteps))``.
    """
    ts = _check_timesteps(timesteps, schedule.T)
    n = len(ts)
    if noise is not None and (noise.shape[0] < n - 1 or tuple(noise.shape[1:]) != tuple(x_start.shape)):
        raise ValueError(
            f"noise must have shape ({n - 1} or {n}, {', '.join(map(str, x_start.shape))}), got {tuple(noise.shape)}"
        )
    net_t = (
        [int(schedule.timestep_map[t]) for t in ts] if isinstance(schedule, RespacedSchedule) else ts
    )
    sub = schedule.respaced(ts)  # respaced index k = n - i  <->  timestep ts[i]

    x = x_start
    for i in range(n):
        k = n - i
        g, alpha, beta = float(sub.gammas[k]), float(sub.alphas[k]), float(sub.betas[k])
        eps = masked_eps(eps_fn, x, net_t[i], mask)
        if clip is None:
            x = (x - (beta / math.sqrt(1.0 - g)) * eps) * (1.0 / math.sqrt(alpha))
        else:
            x0 = ((x - math.sqrt(1.0 - g) * eps) * (1.0 / math.sqrt(g))).clamp(clip[0], clip[1])
            c0, ct = (float(c) for c in sub.posterior_mean_coefs(k))
            x = c0 * x0 + ct * x
        if k > 1:
            if noise is not None:
                z = noise[i].to(device=x.device, dtype=x.dtype)
            else:
                z = randn_on(generator, x.shape, x.device, x.dtype)
            z = z if mask is None else z * mask
            x = x + (math.sqrt(float(sub.posterior_variances[k])) * tau_d) * z
        if progress is not None:
            progress(i, n)
    return SampleResult(x0=x, nfe=n)
