"""ftddm_trt.diffusion: schedules, samplers and losses; pure tensor math, no networks.

Timesteps are 1-based (``gammas[0] = 1``); samplers take ``eps_fn(x_t, t)`` with the condition bound inside.
"""

from .losses import eps_loss, flow_guide_loss, flow_loss, sample_train_timesteps
from .samplers import (
    DEFAULT_LAMBDA_MIN,
    MAX_DISTILLED_STEPS,
    EpsFn,
    ProgressFn,
    SampleResult,
    ancestral_sample,
    ddpm_timesteps,
    distilled_sample,
    distilled_timesteps,
    dpm_solver_pp_sample,
    dpm_solver_timesteps,
    draw_ancestral_noise,
    initial_noise,
    lambda_clipped_start,
    lambda_clipped_timesteps,
    masked_eps,
    randn_on,
    respaced_timesteps,
    truncated_timesteps,
)
from .schedule import CosineSchedule, DiscreteSchedule, RespacedSchedule, cosine_betas

__all__ = [
    "DEFAULT_LAMBDA_MIN",
    "MAX_DISTILLED_STEPS",
    "distilled_sample",
    "distilled_timesteps",
    "CosineSchedule",
    "DiscreteSchedule",
    "EpsFn",
    "ProgressFn",
    "RespacedSchedule",
    "SampleResult",
    "ancestral_sample",
    "cosine_betas",
    "ddpm_timesteps",
    "dpm_solver_pp_sample",
    "dpm_solver_timesteps",
    "lambda_clipped_start",
    "lambda_clipped_timesteps",
    "draw_ancestral_noise",
    "eps_loss",
    "flow_guide_loss",
    "flow_loss",
    "initial_noise",
    "masked_eps",
    "randn_on",
    "respaced_timesteps",
    "sample_train_timesteps",
    "truncated_timesteps",
]
