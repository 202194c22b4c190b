"""Samplers, one file per algorithm; all take ``eps_fn(x_t, t)`` and return :class:`SampleResult`."""

from .ancestral import (
    ancestral_sample,
    ddpm_timesteps,
    draw_ancestral_noise,
    respaced_timesteps,
    truncated_timesteps,
)
from .base import EpsFn, ProgressFn, SampleResult, initial_noise, masked_eps, randn_on
from .distilled import MAX_DISTILLED_STEPS, distilled_sample, distilled_timesteps
from .dpm_solver import (
    DEFAULT_LAMBDA_MIN,
    dpm_solver_pp_sample,
    dpm_solver_timesteps,
    lambda_clipped_start,
    lambda_clipped_timesteps,
)

__all__ = [
    "DEFAULT_LAMBDA_MIN",
    "MAX_DISTILLED_STEPS",
    "distilled_sample",
    "distilled_timesteps",
    "EpsFn",
    "ProgressFn",
    "SampleResult",
    "ancestral_sample",
    "ddpm_timesteps",
    "dpm_solver_pp_sample",
    "dpm_solver_timesteps",
    "lambda_clipped_start",
    "lambda_clipped_timesteps",
    "draw_ancestral_noise",
    "initial_noise",
    "masked_eps",
    "randn_on",
    "respaced_timesteps",
    "truncated_timesteps",
]
