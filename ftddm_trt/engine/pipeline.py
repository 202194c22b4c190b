"""The sampling pipeline: one loop over any backend, for every sampler of FTDDM and its baselines.

The math lives in ``ftddm_trt.diffusion``; this module only binds a backend's UNet into the
``eps_fn`` callable the samplers take, draws the flow's latent, and batches a whole volume.

Samplers (``SamplerSpec.name``), with their network function evaluations (NFE):

=================  ==========================================================  ===============
name               what runs                                                    NFE
=================  ==========================================================  ===============
``ftddm``          flow -> x_Ttrunc, ancestral DDPM t = Ttrunc..1 (Alg. 1)      Ttrunc + 1
``ftddm-dpmpp``    flow -> x_Ttrunc, DPM-Solver++(2M) from Ttrunc to 0          passes * steps + 1
                   (``passes`` > 1: the solver runs again from each output)
``ddpm``           ancestral DDPM over the full chain T..1 (``unet_full``)      T
``ddpm-respaced``  ancestral DDPM over ``steps`` evenly spaced steps             steps
``dpmpp``          DPM-Solver++(2M) from pure noise, ``steps`` steps, starting   steps
                   where lambda(t) >= ``lambda_min`` (diffusers' clip)
``flow``           flow only: x_Ttrunc at ``tau_f`` / sqrt(gamma_Ttrunc)       1
``tdpm``           TDPM baseline: GAN generator -> x_Ttrunc, ancestral DDPM     Ttrunc + 1
                   t = Ttrunc..1 (the backend serves the generator as ``flow``)
``munet``          MUNet-FS-cWGAN baseline: ``munet(y, s)``, one evaluation     1
``flow-enhancer``  Flow Enhancer baseline: ``munet(y, s)``, then the enhancer   2
                   flow's reverse pass at ``tau_f`` conditioned on it
=================  ==========================================================  ===============

``ftddm-distilled`` (NFE ``steps + 1``): flow -> x_Ttrunc, then ``steps`` (1 to 3) deterministic DDIM steps of a
student UNet distilled from the default sampler (``training.distill``); the backend serves the student as its
``unet`` (a model folder's ``distilled/`` subfolder, ``models.model_set.distilled_folder``).

``sde=True`` runs either DPM-Solver++ sampler in its SDE form (diffusers' ``sde-dpmsolver++``): fresh noise at
every step, scaled by ``tau_d`` as in ancestral DDPM, the same NFE.

``flow`` reuses the FTDDM flow (the paper's ablation trains a separate flow on x0; at tau_f = 0 ours
returns the centre of q(x_Ttrunc | x0) rescaled to x0 units).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch

from ftddm_trt.constants import QC_CONSISTENCY_WEIGHT, T_DIFFUSION, T_TRUNC, USER_DEFAULT_TAU_F  # noqa: F401 (re-exported)
from ftddm_trt.diffusion import (
    DEFAULT_LAMBDA_MIN,
    MAX_DISTILLED_STEPS,
    CosineSchedule,
    SampleResult,
    ancestral_sample,
    distilled_sample,
    distilled_timesteps,
    dpm_solver_pp_sample,
    lambda_clipped_start,
    randn_on,
    respaced_timesteps,
    truncated_timesteps,
)
from ftddm_trt.diffusion.consistency import data_consistency, keep_if_closer, partial_consistency
from ftddm_trt.engine.backend import Backend
from ftddm_trt.export.manifest import check_flow_ttrunc

SAMPLERS: tuple[str, ...] = (
    "ftddm", "ftddm-dpmpp", "ddpm", "ddpm-respaced", "dpmpp", "flow", "tdpm", "ftddm-distilled", "munet",
    "flow-enhancer",
)
_DEFAULT_STEPS = {"ftddm-dpmpp": 20, "ddpm-respaced": 100, "dpmpp": 20, "ftddm-distilled": 1}


@lru_cache(maxsize=16)
def _clipped_start(lambda_min: float) -> int:
    return lambda_clipped_start(CosineSchedule(T_DIFFUSION), lambda_min)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its settings. ``steps`` is ignored by ftddm, ddpm, flow and the one-shot baselines (``munet``,
    ``flow-enhancer``: ``tau_f`` is the enhancer's temperature, ``tau_d`` unused); a solver's ``steps=None``
    becomes its default at construction (so equal settings compare equal). ``to_dict`` / ``from_dict`` are
    the one serialization (run.json, the Triton server loop's request, benchmark records)."""

    name: str = "ftddm-dpmpp"
    ttrunc: int = T_TRUNC
    steps: int | None = None
    tau_d: float = 0.9
    tau_f: float = 0.9
    #: Clamp every predicted x0 to this range (normalized units; the truth lies in [0, ~2]), as
    #: improved-diffusion's ``clip_denoised``. None: no clamping.
    clip_x0: tuple[float, float] | None = (0.0, 3.0)
    #: Replace the output's acquired k-space band with the measurement (``diffusion.consistency``):
    #: the output reproduces the acquisition. Right when M is the fine quality mask the acquisition
    #: was filtered with (``hr``); with a coarse ``lr`` mask the network predicts the map *inside* M
    #: unfiltered, which the acquisition does not see, so ``consistency_for`` turns it off there.
    data_consistency: bool = True
    #: ``dpmpp`` (from pure noise) only: start the solver at the last t with lambda(t) = log(alpha_t/sigma_t)
    #: >= lambda_min, as diffusers' ``lambda_min_clipped`` (its timestep choice too). None: start at T.
    lambda_min: float | None = DEFAULT_LAMBDA_MIN
    #: ``dpmpp`` / ``ftddm-dpmpp`` only: the SDE form of DPM-Solver++ (diffusers' ``sde-dpmsolver++``), fresh
    #: noise at each step with ``tau_d`` as its std factor. False: the ODE form (deterministic).
    sde: bool = False
    #: ``ftddm-dpmpp`` only: solver passes. Each pass after the first restarts the solver at Ttrunc from the
    #: centre of q(x_Ttrunc | x0) of the previous output, ``sqrt(gamma_Ttrunc) * x0`` (noise-free, as the flow's
    #: mode at tau_f = 0 is), so the UNet corrects its own output once more; ``passes * steps`` UNet calls.
    passes: int = 1

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(self.sde, bool):
            raise ValueError(f"sde must be true or false, got {self.sde!r}")
        if self.sde and self.name not in ("dpmpp", "ftddm-dpmpp"):
            raise ValueError(f"sde is a setting of the DPM-Solver++ samplers (dpmpp, ftddm-dpmpp), not of {self.name}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {self.passes!r}")
        if self.passes > 1 and self.name != "ftddm-dpmpp":
            raise ValueError(f"passes is a setting of ftddm-dpmpp, not of {self.name}")
        if self.steps is None and self.name in _DEFAULT_STEPS:
            object.__setattr__(self, "steps", _DEFAULT_STEPS[self.name])
        if self.clip_x0 is not None:
            lo, hi = (float(v) for v in self.clip_x0)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"clip_x0 must be (lo, hi) with finite lo < hi, got {self.clip_x0}")
            object.__setattr__(self, "clip_x0", (lo, hi))
        if self.lambda_min is not None:
            if not math.isfinite(self.lambda_min):
                raise ValueError(f"lambda_min must be finite or None, got {self.lambda_min}")
            object.__setattr__(self, "lambda_min", float(self.lambda_min))
        if not 1 <= self.ttrunc <= T_DIFFUSION:
            raise ValueError(f"ttrunc must be in 1..{T_DIFFUSION}, got {self.ttrunc}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        # the solvers need distinct integer timesteps: at most one step per timestep of the chain they run
        limit = self.ttrunc if self.name == "ftddm-dpmpp" else T_DIFFUSION
        if self.name == "ftddm-distilled":
            limit = min(MAX_DISTILLED_STEPS, self.ttrunc)
        if self.name == "dpmpp" and self.lambda_min is not None:
            limit = _clipped_start(self.lambda_min) - 1  # diffusers' linspace grid needs distinct steps
        if self.n_steps is not None and self.n_steps > limit:
            raise ValueError(f"{self.name} can take at most {limit} steps"
                             f"{' (Ttrunc)' if self.name == 'ftddm-dpmpp' else ''}, got {self.n_steps}")
        if not (self.tau_d >= 0 and self.tau_f >= 0):
            raise ValueError(f"temperatures must be >= 0, got tau_d={self.tau_d}, tau_f={self.tau_f}")

    @property
    def n_steps(self) -> int | None:
        """The solver steps the sampler runs: ``steps``, else the sampler's default (None when it has none)."""
        return self.steps if self.steps is not None else _DEFAULT_STEPS.get(self.name)

    @property
    def deterministic(self) -> bool:
        """True when the output does not depend on the seed (repeated samples would all be equal)."""
        if self.name == "ftddm-dpmpp":
            return self.tau_f == 0.0 and not (self.sde and self.tau_d > 0.0)
        if self.name in ("flow", "ftddm-distilled", "flow-enhancer"):
            return self.tau_f == 0.0
        if self.name == "munet":
            return True
        return self.name in ("ftddm", "tdpm") and self.tau_f == 0.0 and self.tau_d == 0.0

    @property
    def uses_flow(self) -> bool:
        """The chain starts from the backend's start-point network (flow, or TDPM's generator) at Ttrunc."""
        return self.name in ("ftddm", "ftddm-dpmpp", "flow", "tdpm", "ftddm-distilled")

    @property
    def start_network(self) -> str | None:
        """Which network the backend must serve as its start point (``ModelSet.open(start=...)``), or None."""
        return "tdpm" if self.name == "tdpm" else ("flow" if self.uses_flow else None)

    @property
    def full_chain_unet(self) -> bool:
        """True for the samplers that run the UNet trained on the whole chain (the DDPM baselines)."""
        return self.name in ("ddpm", "ddpm-respaced", "dpmpp")

    @property
    def baseline_networks(self) -> tuple[str, ...]:
        """The networks a one-shot baseline sampler runs instead of the UNet (``munet``, ``flow_enhancer``)."""
        return {"munet": ("munet",), "flow-enhancer": ("munet", "flow_enhancer")}.get(self.name, ())

    @property
    def distilled_unet(self) -> bool:
        """True for the sampler that runs a distilled student as its UNet (``models.model_set.distilled_folder``)."""
        return self.name == "ftddm-distilled"

    @property
    def nfe(self) -> int:
        """Network function evaluations per image (flow pass counted as one)."""
        return {
            "ftddm": self.ttrunc + 1,
            "tdpm": self.ttrunc + 1,
            "ftddm-dpmpp": self.passes * (self.n_steps or 0) + 1,
            "ddpm": T_DIFFUSION,
            "ddpm-respaced": self.n_steps or 0,
            "dpmpp": self.n_steps or 0,
            "flow": 1,
            "ftddm-distilled": (self.n_steps or 0) + 1,
            "munet": 1,
            "flow-enhancer": 2,
        }[self.name]

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON-ready values (``clip_x0`` a list or None), plus the derived ``nfe``."""
        d = asdict(self)
        d["clip_x0"] = None if self.clip_x0 is None else list(self.clip_x0)
        return {**d, "nfe": self.nfe}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamplerSpec":
        """Inverse of :meth:`to_dict` (``from_dict(spec.to_dict()) == spec``). Missing keys take their defaults;
        an unknown key, a wrong type or an ``nfe`` that disagrees with the settings raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"sampler settings must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"nfe"}
        if unknown:
            raise ValueError(f"unknown sampler settings: {sorted(unknown)}")
        kw: dict[str, Any] = {}
        try:
            for k, v in d.items():
                if k == "nfe":
                    continue
                if k == "name":
                    kw[k] = str(v)
                elif k in ("ttrunc", "steps", "passes"):
                    kw[k] = None if v is None and k == "steps" else _as_int(k, v)
                elif k == "clip_x0":
                    kw[k] = None if v is None else tuple(float(x) for x in v)
                    if kw[k] is not None and len(kw[k]) != 2:
                        raise ValueError(f"clip_x0 must be [lo, hi] or null, got {v!r}")
                elif k == "lambda_min":
                    kw[k] = None if v is None else float(v)
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    kw[k] = float(v)
                else:
                    kw[k] = v
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad sampler settings {dict(d)}: {err}") from err
        spec = cls(**kw)
        if "nfe" in d and d["nfe"] != spec.nfe:
            raise ValueError(f"sampler settings say nfe={d['nfe']} but {spec.name} with them costs {spec.nfe}")
        return spec


def _as_int(key: str, v: Any) -> int:
    """An integer setting; floats with a fraction, bools and strings are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return int(v)


CONSISTENCY_MODES: tuple[str, ...] = ("auto", "on", "off")


def consistency_for(spec: SamplerSpec, mode: str, fine_mask: bool) -> SamplerSpec:
    """``spec`` with data consistency set by ``mode``: on, off, or auto (on exactly for a fine mask M)."""
    if mode not in CONSISTENCY_MODES:
        raise ValueError(f"data consistency must be one of {', '.join(CONSISTENCY_MODES)}, got {mode!r}")
    return replace(spec, data_consistency=fine_mask if mode == "auto" else mode == "on")


def qc_consistency_applies(spec: SamplerSpec, fine_mask: torch.Tensor | None, weight: float) -> bool:
    """Whether :func:`qc_consistency` runs: a weight, a fine-mask estimate (the ``lr`` protocol, a model with
    a fine-mask estimator) and no full data consistency already applied by ``spec``."""
    return weight > 0 and fine_mask is not None and not spec.data_consistency


def qc_step_weight(requested: float | None, fine_mask_net: Any | None) -> float:
    """The qc consistency weight to use: ``requested`` when given, else the fine-mask estimator's own
    (``models.fine_mask.FineMaskConfig.consistency_weight``), else the weight for the qc maps' estimate
    (``QC_CONSISTENCY_WEIGHT``)."""
    if requested is not None:
        return requested
    return fine_mask_net.config.consistency_weight if fine_mask_net is not None else QC_CONSISTENCY_WEIGHT


def qc_consistency(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, fine_mask: torch.Tensor, weight: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``lr`` protocol: put a share ``weight`` of the acquired band back through the fine-mask estimate
    (``diffusion.consistency.partial_consistency``), then cut by M as every output is; per image, the
    corrected output is kept only where it agrees at least as well with the acquired band as ``x``
    (``diffusion.consistency.keep_if_closer``: do no harm).

    x: (B,1,64,64) outputs and y: (B,4,64,64) their condition, normalized units; s: (B,);
    fine_mask: (B,1,64,64) estimate of the fine quality mask.

    Returns ``(outputs (B,1,64,64), applied (B,) bool)``.
    """
    corrected = partial_consistency(x, y[:, 0:1], fine_mask, s, weight) * y[:, 1:2]
    return keep_if_closer(x, corrected, y[:, 0:1], s)


def require_flow_ttrunc(backend: Backend, spec: SamplerSpec) -> None:
    """Refuse (TtruncMismatch, naming Ttrunc) a flow sampler whose ``spec.ttrunc`` is not the Ttrunc the
    backend's flow was trained for; samplers without the flow and unrecorded Ttruncs pass."""
    if spec.uses_flow:
        check_flow_ttrunc(backend.flow_ttrunc, spec.ttrunc, backend.origin())


def make_eps_fn(
    backend: Backend, y: torch.Tensor, s: torch.Tensor, full: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Bind the condition into the ``eps_fn(x_t, t)`` callable the samplers take."""

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return backend.unet(x_t, y, t, s, full=full)

    return eps_fn


def sample_batch(
    backend: Backend,
    spec: SamplerSpec,
    y: torch.Tensor,
    s: torch.Tensor,
    generator: torch.Generator,
    schedule: CosineSchedule | None = None,
    on_pass: Callable[[torch.Tensor], None] | None = None,
) -> SampleResult:
    """Super-resolve one batch. y: (B,4,64,64) condition (channel 1 is the mask M); s: (B,).

    Returns the normalized x0 estimate (B,1,64,64), zero outside M, and the NFE it cost.
    ``on_pass`` (optional) receives, for k = 1 .. ``spec.passes``, exactly what the same call with
    ``passes = k`` returns (pass k's output, data consistency applied where the spec has it): the
    passes of one run share their draws, so a sweep over passes needs only the longest run.
    """
    require_flow_ttrunc(backend, spec)
    schedule = schedule or CosineSchedule(T_DIFFUSION)
    dev = backend.device
    y = y.to(dev)
    s = s.to(dev)
    mask = y[:, 1:2]
    b = y.shape[0]
    eps_fn = make_eps_fn(backend, y, s, spec.full_chain_unet)

    def noise() -> torch.Tensor:
        return randn_on(generator, (b, 1, *y.shape[2:]), dev)

    def finish(x0: torch.Tensor) -> torch.Tensor:  # data consistency once, on the output
        return data_consistency(x0, y[:, 0:1], s) * mask if spec.data_consistency else x0

    if spec.baseline_networks:  # MUNet (and its flow enhancer): one-shot x0 estimators, no chain
        x0 = backend.munet(y, s) * mask
        if spec.name == "flow-enhancer":
            tau_f = torch.full((b,), spec.tau_f, dtype=torch.float32, device=dev)
            x0 = backend.enhancer_reverse(noise(), y, x0, tau_f) * mask
        if spec.clip_x0 is not None:
            x0 = x0.clamp(*spec.clip_x0) * mask
        x0 = finish(x0)
        if on_pass is not None:
            on_pass(x0)
        return SampleResult(x0=x0, nfe=spec.nfe)

    if spec.uses_flow:  # FTDDM: the flow draws x_Ttrunc (one evaluation), the chain starts there
        tau_f = torch.full((b,), spec.tau_f, dtype=torch.float32, device=dev)
        x_start = backend.flow_reverse(noise(), y, tau_f) * mask
        t_start, flow_nfe = spec.ttrunc, 1
    else:  # baselines: pure noise inside M at t = T
        x_start, t_start, flow_nfe = noise() * mask, T_DIFFUSION, 0

    if spec.name == "flow":
        res = SampleResult(x0=x_start / math.sqrt(float(schedule.gammas[spec.ttrunc])), nfe=0)
    elif spec.name in ("ftddm-dpmpp", "dpmpp"):
        def solve(start: torch.Tensor) -> SampleResult:
            return dpm_solver_pp_sample(
                eps_fn,
                start,
                mask,
                schedule,
                t_start=t_start,
                steps=spec.n_steps,
                clip=spec.clip_x0,
                lambda_min=spec.lambda_min if spec.name == "dpmpp" else None,
                sde=spec.sde,
                tau=spec.tau_d,
                generator=generator,
            )

        res = solve(x_start)
        for _ in range(spec.passes - 1):  # restart at Ttrunc from the output's centre sqrt(gamma) * x0
            if on_pass is not None:
                on_pass(finish(res.x0))
            again = solve(math.sqrt(float(schedule.gammas[t_start])) * res.x0 * mask)
            # do no harm: a pass is kept, per image, only where it agrees at least as well with the acquired band
            x0, _ = keep_if_closer(res.x0, again.x0, y[:, 0:1], s)
            res = SampleResult(x0=x0, nfe=res.nfe + again.nfe)
    elif spec.name == "ftddm-distilled":
        res = distilled_sample(eps_fn, x_start, mask, schedule, distilled_timesteps(t_start, spec.n_steps),
                               clip=spec.clip_x0)
    else:
        timesteps = (
            respaced_timesteps(T_DIFFUSION, spec.n_steps)
            if spec.name == "ddpm-respaced"
            else truncated_timesteps(t_start)
        )
        res = ancestral_sample(
            eps_fn, x_start, mask, schedule, timesteps, tau_d=spec.tau_d, generator=generator, clip=spec.clip_x0
        )
    x0 = finish(res.x0)
    if on_pass is not None:
        on_pass(x0)
    return SampleResult(x0=x0, nfe=res.nfe + flow_nfe)


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of the noise generator of batch ``batch_index`` (shared by every loop, client or server)."""
    return seed * 1_000_003 + batch_index


#: Samples one batch: (y (B,4,64,64), s (B,), generator seed) -> SampleResult.
BatchSampler = Callable[[torch.Tensor, torch.Tensor, int], SampleResult]


def sample_images(
    backend: Backend,
    spec: SamplerSpec,
    y: torch.Tensor,
    s: torch.Tensor,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    batch_sampler: BatchSampler | None = None,
) -> tuple[torch.Tensor, int]:
    """Super-resolve K images in batches (whole-volume batching).

    y: (K,4,64,64), s: (K,). Batch i draws its noise from a generator seeded by ``batch_seed(seed, i)``,
    so a result depends on the seed and the batch size, never on the backend (nor, for a backend with
    ``map_batches`` such as ``TritonPool``, on which server ran a batch). ``batch_sampler``
    replaces the in-process loop for one batch (e.g. Triton's server-side sampler); by default
    ``sample_batch`` runs here. ``progress(n_done)`` is called after each batch.
    Returns (x0 (K,1,64,64) on the CPU, NFE per image).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    require_flow_ttrunc(backend, spec)
    if batch_sampler is None:
        schedule = CosineSchedule(T_DIFFUSION)

        def batch_sampler(yb: torch.Tensor, sb: torch.Tensor, bseed: int) -> SampleResult:
            return sample_batch(backend, spec, yb, sb, torch.Generator().manual_seed(bseed), schedule)

    k = y.shape[0]
    n_batches = -(-k // batch_size)

    def run(i: int) -> SampleResult:
        start = i * batch_size
        return batch_sampler(y[start : start + batch_size], s[start : start + batch_size], batch_seed(seed, i))

    images_done = 0

    def done(i: int) -> None:
        nonlocal images_done
        images_done += min(batch_size, k - i * batch_size)
        if progress is not None:
            progress(images_done)

    map_batches = getattr(backend, "map_batches", None)  # a pool of servers runs batches concurrently
    if map_batches is not None:
        results = map_batches(run, n_batches, done)
    else:
        results = []
        for i in range(n_batches):
            results.append(run(i))
            done(i)
    nfe = results[-1].nfe if results else spec.nfe
    return torch.cat([r.x0.float().cpu() for r in results]), nfe
