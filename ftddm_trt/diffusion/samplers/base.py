"""What every sampler shares: the eps callable type, the result record and small helpers.

Samplers never see a network. The caller binds the condition ``y`` and the upscaling factor ``s`` inside
``eps_fn(x_t, t)``; ``t`` is a ``(B,)`` float32 tensor of *original* 1-based timesteps (``1..T``), even on a
respaced or truncated chain.

Flow only needs no sampler here: ``engine.pipeline`` wraps the flow's reverse output in a
``SampleResult`` itself (with ``Ttrunc = 0`` the flow output is x0 directly; for a flow trained on
``x_Ttrunc`` the pipeline rescales it to an x0 estimate). The pipeline also adds the flow pass to the NFE
of the truncated samplers (FTDDM: ``Ttrunc + 1``); ``SampleResult.nfe`` from this package counts
``eps_fn`` calls only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EpsFn", "ProgressFn", "SampleResult", "initial_noise", "masked_eps", "randn_on"]

#: ``eps_fn(x_t: (B,1,H,W), t: (B,) float32) -> (B,1,H,W)`` predicted noise.
EpsFn = Callable[[Tensor, Tensor], Tensor]
#: ``progress(step_index, n_steps)``, called after each finished step, ``step_index`` in ``0..n_steps-1``.
ProgressFn = Callable[[int, int], None]


@dataclass
class SampleResult:
    """A sampler's output: the sample ``x0`` (same shape, dtype and device as ``x_start``) and ``nfe``, the
    number of ``eps_fn`` calls (UNet evaluations; a flow pass is not counted here)."""

    x0: Tensor
    nfe: int


def randn_on(
    generator: torch.Generator | None,
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit normals of ``shape`` drawn where ``generator`` lives, then moved to ``device`` as ``dtype``.

    torch refuses a CPU generator for a CUDA draw, and a CUDA generator draws other numbers than a CPU
    one for the same seed. Drawing on the generator's own device (in float32, or float64 when ``dtype``
    is float64) and then moving the tensor makes one seed give the same noise on every backend and in
    every reduced precision. Without a generator the draw happens on ``device`` (its default generator).
    """
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    where = generator.device if generator is not None else torch.device(device)
    z = torch.randn(tuple(shape), generator=generator, device=where, dtype=draw_dtype)
    return z.to(device=device, dtype=dtype)


def initial_noise(mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x_T = M * z``, ``z ~ N(0, I)``: the start of a full (untruncated) chain, noise only inside the mask.

    Has ``mask``'s shape, dtype and device; drawn on the generator's device (see :func:`randn_on`)."""
    return mask * randn_on(generator, mask.shape, mask.device, mask.dtype)


def masked_eps(eps_fn: EpsFn, x: Tensor, t: int, mask: Tensor | None) -> Tensor:
    """One network call at original timestep ``t``: ``M * eps_fn(x, t)`` in ``x``'s dtype.

    Masking the prediction is the reverse of the masked forward process (the noise in the background is
    zero by construction), so a background that starts at zero stays exactly zero.
    """
    t_vec = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
    eps = eps_fn(x, t_vec).to(dtype=x.dtype)
    return eps if mask is None else eps * mask
