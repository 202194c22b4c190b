"""Discrete Gaussian diffusion schedules with 1-based timesteps.

Conventions (docs/architecture.md; the paper's Sect. 2.2, Dong et al. 2024):

- ``betas[t]`` for ``t = 1..T``; index 0 holds a padding ``beta_0 = 0`` so that every table is indexed
  by the timestep itself.
- ``gammas[t] = prod_{i=1..t} (1 - beta_i)`` (alphas_cumprod), ``gammas[0] = 1``.
- Forward process with noise only inside the mask M:
  ``x_t = sqrt(gamma_t) x0 + sqrt(1 - gamma_t) * M * eps``.
- diffusers' 0-based index ``k`` is our ``t = k + 1``: ``gammas[1:]`` equals diffusers' ``alphas_cumprod``.

Every table is a float64 CPU tensor; methods that touch data cast the constants to the data's dtype and
device at the point of use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["DiscreteSchedule", "CosineSchedule", "RespacedSchedule", "cosine_betas"]


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), eq. 17: ``beta_t = min(1 - abar(t/T) / abar((t-1)/T), max_beta)``.

    ``abar(u) = cos((u + s) / (1 + s) * pi / 2) ** 2``. Returns a float64 tensor of shape ``(T + 1,)`` whose
    entry 0 is the padding ``beta_0 = 0`` and entries ``1..T`` are the betas (the same numbers as
    improved-diffusion's ``betas_for_alpha_bar`` and diffusers' ``squaredcos_cap_v2``).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")

    def abar(u: float) -> float:
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    betas = [0.0] + [min(1.0 - abar(t / T) / abar((t - 1) / T), max_beta) for t in range(1, T + 1)]
    return torch.tensor(betas, dtype=torch.float64)


def _as_index(t: Tensor | int | Iterable[int]) -> Tensor:
    """Timestep(s) as a CPU int64 tensor, for indexing the float64 tables."""
    if isinstance(t, Tensor):
        return t.detach().to("cpu").long()
    if isinstance(t, int):
        return torch.tensor([t], dtype=torch.long)
    return torch.as_tensor(list(t), dtype=torch.long)


class DiscreteSchedule:
    """A variance-preserving discrete diffusion schedule, given by its betas (1-based, see module docstring).

    Attributes (float64, CPU, shape ``(T + 1,)``): ``betas``, ``alphas = 1 - betas``, ``gammas``
    (alphas_cumprod with ``gammas[0] = 1``), ``posterior_variances`` (the "fixed small" sigma_t^2,
    0 at t = 1).
    """

    def __init__(self, betas: Tensor, gammas: Tensor | None = None) -> None:
        """``betas``: ``[0, beta_1, ..., beta_T]``. ``gammas`` (optional, same shape, ``gammas[0] = 1``): exact
        cumulative products to use instead of ``cumprod(1 - betas)`` (a respaced chain takes its parent's
        values, avoiding the round trip through ``1 - beta``)."""
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError("betas must be a 1-D tensor [beta_0 = 0, beta_1, ..., beta_T]")
        if betas[0] != 0.0:
            raise ValueError("betas[0] is the padding entry and must be 0 (timesteps are 1-based)")
        if not bool(((betas[1:] > 0) & (betas[1:] <= 1)).all()):
            raise ValueError("betas[1:] must lie in (0, 1]")
        self.betas: Tensor = betas
        if gammas is None:
            self.alphas: Tensor = 1.0 - betas
            self.gammas: Tensor = torch.cumprod(self.alphas, dim=0)
        else:
            gammas = torch.as_tensor(gammas, dtype=torch.float64).detach().cpu().clone()
            if gammas.shape != betas.shape or gammas[0] != 1.0:
                raise ValueError("gammas must have the shape of betas and gammas[0] = 1")
            self.gammas = gammas
            self.alphas = torch.ones_like(betas)
            self.alphas[1:] = gammas[1:] / gammas[:-1]
        g_prev = torch.cat([self.gammas[:1], self.gammas[:-1]])
        # sigma_t^2 = (1 - gamma_{t-1}) / (1 - gamma_t) * beta_t; index 0 is padding (0).
        var = torch.zeros_like(betas)
        var[1:] = (1.0 - g_prev[1:]) / (1.0 - self.gammas[1:]) * betas[1:]
        self.posterior_variances: Tensor = var

    # ------------------------------------------------------------------ basic facts
    @property
    def T(self) -> int:
        """Number of diffusion steps (the largest valid timestep)."""
        return self.betas.numel() - 1

    def _check(self, idx: Tensor, lo: int = 1) -> None:
        if idx.numel() and (int(idx.min()) < lo or int(idx.max()) > self.T):
            raise ValueError(f"timesteps must lie in [{lo}, {self.T}], got [{int(idx.min())}, {int(idx.max())}]")

    @staticmethod
    def _bcast(values: Tensor, like: Tensor) -> Tensor:
        """(B,) float64 constants -> (B, 1, ..., 1) in ``like``'s dtype and device."""
        return values.to(dtype=like.dtype).to(like.device).view(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor, mask: Tensor | None = None) -> Tensor:
        """Sample ``q(x_t | x0)``: ``x_t = sqrt(gamma_t) x0 + sqrt(1 - gamma_t) * M * eps`` (the
        paper's Sect. 2.2, with the square root restored; noise only inside the mask M).

        ``t`` is a ``(B,)`` integer tensor in ``1..T``; ``mask=None`` means M = 1 everywhere.
        """
        idx = _as_index(t)
        self._check(idx, lo=0)
        g = self.gammas[idx]
        noise = eps if mask is None else mask * eps
        return self._bcast(g.sqrt(), x0) * x0 + self._bcast((1.0 - g).sqrt(), x0) * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert the forward process for x0 (improved-diffusion's ``_predict_xstart_from_eps``):
        ``x0 = (x_t - sqrt(1 - gamma_t) eps) / sqrt(gamma_t)``."""
        idx = _as_index(t)
        self._check(idx, lo=0)
        g = self.gammas[idx]
        return (x_t - self._bcast((1.0 - g).sqrt(), x_t) * eps) / self._bcast(g.sqrt(), x_t)

    # ------------------------------------------------------------------ posterior q(x_{t-1} | x_t, x0)
    def posterior_mean_coefs(self, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """Coefficients of the posterior mean ``mu_t = c0 * x0 + ct * x_t`` (Ho et al. 2020, eq. 7):
        ``c0 = sqrt(gamma_{t-1}) beta_t / (1 - gamma_t)``, ``ct = sqrt(alpha_t) (1 - gamma_{t-1}) / (1 - gamma_t)``.

        Returns two float64 CPU tensors of shape ``(B,)`` (``t`` in ``1..T``).
        """
        idx = _as_index(t)
        self._check(idx)
        g, g_prev = self.gammas[idx], self.gammas[idx - 1]
        c0 = g_prev.sqrt() * self.betas[idx] / (1.0 - g)
        ct = self.alphas[idx].sqrt() * (1.0 - g_prev) / (1.0 - g)
        return c0, ct

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``mu_t(x_t, x0) = c0 x0 + ct x_t`` with the coefficients of :meth:`posterior_mean_coefs`."""
        c0, ct = self.posterior_mean_coefs(t)
        return self._bcast(c0, x_t) * x0 + self._bcast(ct, x_t) * x_t

    def posterior_variance(self, t: Tensor | int) -> Tensor:
        """"Fixed small" variance ``sigma_t^2 = (1 - gamma_{t-1}) / (1 - gamma_t) * beta_t`` (paper eq. 12);
        float64 CPU tensor of shape ``(B,)``, 0 at ``t = 1``."""
        idx = _as_index(t)
        self._check(idx)
        return self.posterior_variances[idx]

    # ------------------------------------------------------------------ respacing
    def respaced(self, timesteps: Iterable[int]) -> RespacedSchedule:
        """Keep only ``timesteps`` (any order, unique, each in ``1..T``): improved-diffusion's ``SpacedDiffusion``.

        With the kept steps sorted ``t_1 < ... < t_K`` and ``t_0 = 0``, the new chain has
        ``beta'_k = 1 - gamma_{t_k} / gamma_{t_{k-1}}`` so that ``gamma'_k = gamma_{t_k}``; its
        ``timestep_map[k] = t_k`` is what the network is fed (always the original t).
        """
        kept = sorted(int(t) for t in timesteps)
        if not kept:
            raise ValueError("timesteps is empty")
        if len(set(kept)) != len(kept):
            raise ValueError("timesteps must be unique")
        if kept[0] < 1 or kept[-1] > self.T:
            raise ValueError(f"timesteps must lie in [1, {self.T}]")
        tmap = torch.tensor([0] + kept, dtype=torch.long)
        g = self.gammas[tmap]
        new_betas = torch.zeros(len(kept) + 1, dtype=torch.float64)
        new_betas[1:] = 1.0 - g[1:] / g[:-1]
        return RespacedSchedule(new_betas, tmap, parent=self, gammas=g)


class CosineSchedule(DiscreteSchedule):
    """The paper's forward process: cosine schedule (Nichol & Dhariwal 2021), ``T = 1000``, ``s = 0.008``,
    betas clipped at ``max_beta = 0.999``. Equal to diffusers'
    ``DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")`` with ``t = k + 1``."""

    def __init__(self, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        super().__init__(cosine_betas(T, s, max_beta))
        self.s = s
        self.max_beta = max_beta


class RespacedSchedule(DiscreteSchedule):
    """A schedule over a subset of another schedule's steps (see :meth:`DiscreteSchedule.respaced`).

    Its own timesteps are the respaced indices ``k = 1..K``; ``timestep_map[k]`` (int64, ``timestep_map[0] = 0``)
    is the original ``t`` that the network must be fed, and ``gammas[k] == parent.gammas[timestep_map[k]]``.
    """

    def __init__(
        self, betas: Tensor, timestep_map: Tensor, parent: DiscreteSchedule, gammas: Tensor | None = None
    ) -> None:
        super().__init__(betas, gammas)
        self.timestep_map: Tensor = timestep_map
        self.parent: DiscreteSchedule = parent
