"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095), data prediction: the ODE form and its SDE form.

Used by the paper (Table 4) on the full chain and on the truncated chain of FTDDM. The ODE form
(diffusers' ``algorithm_type="dpmsolver++"``) is deterministic; the SDE form (``"sde-dpmsolver++"``) adds fresh
noise at every step, which, like ancestral DDPM, keeps forgetting the network's errors of earlier steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..schedule import DiscreteSchedule, RespacedSchedule
from .base import EpsFn, ProgressFn, SampleResult, masked_eps, randn_on

__all__ = ["dpm_solver_pp_sample", "dpm_solver_timesteps", "lambda_clipped_start", "lambda_clipped_timesteps"]

#: The lambda threshold commonly used with the cosine schedule (diffusers' tests and users of
#: ``DPMSolverMultistepScheduler(lambda_min_clipped=-5.1)``): with T = 1000 the solver then starts at t = 996
#: (gamma = 3.9e-5, sigma/alpha = 160) instead of t = 1000 (gamma = 2.4e-9, sigma/alpha = 2e4).
DEFAULT_LAMBDA_MIN = -5.1


def dpm_solver_timesteps(t_start: int, steps: int) -> list[int]:
    """The solver grid ``t_0 = t_start > t_1 > ... > t_steps = 0`` (1-based timesteps, 0 is x0):
    ``np.linspace(t_start, 0, steps + 1).round()`` (numpy rounding, half to even).

    The network is evaluated at ``t_0 .. t_{steps-1}`` (all >= 1 and distinct since ``steps <= t_start``);
    ``t_steps = 0`` (``gamma_0 = 1``, noise level 0) is the target of the last step.

    Mapping to diffusers: ``DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=
    "squaredcos_cap_v2", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    lower_order_final=True, final_sigmas_type="zero")`` with
    ``set_timesteps(timesteps=[t - 1 for t in grid[:-1]])`` runs the same trajectory: diffusers' sigma at
    0-based ``k`` is ours at ``t = k + 1``, and its appended final sigma 0 (``final_sigmas_type="zero"``) is our
    ``t = 0``.
    """
    if not 1 <= steps <= t_start:
        raise ValueError(f"need 1 <= steps <= t_start, got steps={steps}, t_start={t_start}")
    grid = np.linspace(t_start, 0, steps + 1).round().astype(np.int64)
    return [int(t) for t in grid]


def _lambdas(schedule: DiscreteSchedule) -> Tensor:
    """``lambda(t) = log(alpha_t) - log(sigma_t)`` for ``t = 1..T`` (float64, index ``t - 1``)."""
    g = schedule.gammas[1:]
    return 0.5 * (torch.log(g) - torch.log1p(-g))


def lambda_clipped_start(schedule: DiscreteSchedule, lambda_min: float) -> int:
    """The largest 1-based ``t`` with ``lambda(t) >= lambda_min``: where diffusers'
    ``DPMSolverMultistepScheduler(lambda_min_clipped=lambda_min)`` starts (its 0-based ``last_timestep - 1``).

    ``lambda`` decreases with ``t``; ``lambda_min = -inf`` gives ``T``. A threshold above ``lambda(1)`` leaves
    no timestep and raises ValueError.
    """
    ok = torch.nonzero(_lambdas(schedule) >= lambda_min)
    if ok.numel() == 0:
        raise ValueError(f"lambda_min={lambda_min} is above lambda(1); no timestep is left to start from")
    return int(ok.max()) + 1


def lambda_clipped_timesteps(schedule: DiscreteSchedule, steps: int, lambda_min: float,
                             t_max: int | None = None) -> list[int]:
    """diffusers' solver grid with ``lambda_min_clipped`` and ``timestep_spacing="linspace"``, 1-based, with the
    final target 0 (x0) appended: ``L = min(t_max, lambda_clipped_start(schedule, lambda_min))`` and
    ``[1 + k for k in np.linspace(0, L - 1, steps + 1).round()[::-1][:-1]] + [0]``.

    So ``grid[0] = L`` and the last evaluated step is ``1 + round((L - 1) / steps)``, exactly as
    ``DPMSolverMultistepScheduler.set_timesteps(steps)`` picks them (its 0-based ``k`` is our ``k + 1``).
    """
    t_max = schedule.T if t_max is None else t_max
    last = min(t_max, lambda_clipped_start(schedule, lambda_min))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ks = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    grid = [int(k) + 1 for k in ks] + [0]
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{steps} steps from t={last} give repeated timesteps: {grid}")
    return grid


@torch.no_grad()
def dpm_solver_pp_sample(
    eps_fn: EpsFn,
    x_start: Tensor,
    mask: Tensor | None,
    schedule: DiscreteSchedule,
    t_start: int,
    steps: int,
    order: int = 2,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    clip: tuple[float, float] | None = None,
    lambda_min: float | None = None,
    sde: bool = False,
    tau: float = 1.0,
) -> SampleResult:
    """DPM-Solver++(2M), 'midpoint' form (diffusers' default), from ``x_start = x_{t_start}`` to x0.

    With ``alpha_t = sqrt(gamma_t)``, ``sigma_t = sqrt(1 - gamma_t)``, ``lambda_t = log(alpha_t / sigma_t)`` and
    the data prediction ``D_i = (x_{t_i} - sigma_{t_i} * M * eps_fn(x_{t_i}, t_i)) / alpha_{t_i}``, on the grid
    of :func:`dpm_solver_timesteps` (``h_i = lambda_{t_{i+1}} - lambda_{t_i}``):

    - first order (DDIM), used at the first step and at the last (``lower_order_final``; the last step
      goes to noise level 0, where it returns ``D``)::

        x_{t_{i+1}} = sigma_{t_{i+1}} / sigma_{t_i} * x_{t_i} - alpha_{t_{i+1}} (exp(-h_i) - 1) D_i

    - second order multistep (Lu et al. 2022, Algorithm 2, midpoint), ``r = h_{i-1} / h_i``::

        x_{t_{i+1}} = sigma_{t_{i+1}} / sigma_{t_i} * x_{t_i}
                      - alpha_{t_{i+1}} (exp(-h_i) - 1) (D_i + (D_i - D_{i-1}) / (2 r))

    ``sde=True`` runs the SDE form instead (diffusers' ``algorithm_type="sde-dpmsolver++"``, the same grid and
    data predictions; ``D' = D_i`` at first order, ``D_i + (D_i - D_{i-1}) / (2 r)`` at second)::

        x_{t_{i+1}} = sigma_{t_{i+1}} / sigma_{t_i} * exp(-h_i) * x_{t_i} + alpha_{t_{i+1}} (1 - exp(-2 h_i)) D'
                      + tau * sigma_{t_{i+1}} sqrt(1 - exp(-2 h_i)) * M z_i,        z_i ~ N(0, I)

    with one draw ``z_i`` from ``generator`` per step except the last (whose noise level is 0). ``tau`` is a
    standard-deviation factor on that noise, as ``tau_d`` in ancestral sampling; ``tau = 1`` is diffusers'
    solver (whose ``step(..., variance_noise=tau * z)`` gives ours). The ODE form ignores ``tau`` and
    ``generator``.

    ``t_start = T`` with ``x_start = initial_noise(mask)`` samples from pure noise; ``t_start = Ttrunc`` with
    the flow output runs the truncated chain (paper Table 4). Background outside M stays at its start value
    (zero).
    Coefficients are computed in float64 and applied in ``x_start``'s dtype. ``clip = (lo, hi)`` clamps
    each data prediction ``D_i`` (a static form of diffusers' ``thresholding``; data-prediction solvers
    are the ones where clamping x0 is sound, Lu et al. 2022 section 4).

    ``lambda_min`` (diffusers' ``lambda_min_clipped``, "critical for cosine schedules"): ``None`` runs the grid of
    :func:`dpm_solver_timesteps` from ``t_start``; a number runs diffusers' grid of
    :func:`lambda_clipped_timesteps` (at most ``t_start``), treating ``x_start`` as the sample at its first
    timestep. From pure noise this skips the last few steps of the cosine chain, where ``sigma/alpha`` reaches
    2e4 and multiplies any eps error in the first data prediction; ``x_start = M z`` stays the right start
    because ``alpha`` there is still below 0.01.

    Returns ``SampleResult(x0, nfe=steps)``.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if t_start > schedule.T:
        raise ValueError(f"t_start={t_start} exceeds T={schedule.T}")
    if lambda_min is None:
        grid = dpm_solver_timesteps(t_start, steps)
    else:
        grid = lambda_clipped_timesteps(schedule, steps, lambda_min, t_max=t_start)
    tmap = schedule.timestep_map if isinstance(schedule, RespacedSchedule) else None

    def consts(t: int) -> tuple[float, float, float]:
        g = float(schedule.gammas[t])
        alpha, sigma = math.sqrt(g), math.sqrt(1.0 - g)
        lam = math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)
        return alpha, sigma, lam

    x = x_start
    d_prev: Tensor | None = None
    lam_prev = 0.0
    for i in range(steps):
        s, t = grid[i], grid[i + 1]
        alpha_s, sigma_s, lam_s = consts(s)
        alpha_t, sigma_t, lam_t = consts(t)
        eps = masked_eps(eps_fn, x, int(tmap[s]) if tmap is not None else s, mask)
        d = (x - sigma_s * eps) * (1.0 / alpha_s)  # data prediction x0_theta(x_s, s)
        if clip is not None:
            d = d.clamp(clip[0], clip[1])
        if t == 0 or sigma_t == 0.0:
            x = d  # exp(-h) = 0, sigma_t = 0, alpha_t = 1: the step to x0 returns the data prediction
        else:
            h = lam_t - lam_s
            first_order = order == 1 or d_prev is None or i == steps - 1
            d_hat = d if first_order else d + (0.5 / ((lam_s - lam_prev) / h)) * (d - d_prev)
            if sde:
                one_minus_e2h = -math.expm1(-2.0 * h)  # 1 - exp(-2 h)
                z = randn_on(generator, x.shape, x.device, x.dtype)
                z = z if mask is None else z * mask
                x = ((sigma_t / sigma_s) * math.exp(-h)) * x + (alpha_t * one_minus_e2h) * d_hat \
                    + (tau * sigma_t * math.sqrt(one_minus_e2h)) * z
            else:
                x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d_hat  # alpha_t (exp(-h) - 1)
        d_prev, lam_prev = d, lam_s
        if progress is not None:
            progress(i, steps)
    return SampleResult(x0=x, nfe=steps)
