"""Flow Enhancer baseline (Dong et al. 2022c, "Flow-based visual quality enhancer for super-resolution
MRSI"): a conditional normalizing flow that turns MUNet's blurry estimate into a sharper sample. Sampling
runs MUNet once and the flow's reverse pass once (NFE 2). Written from the publication's description.

The flow is FTDDM's own conditional flow (``models.flow.ConditionalFlow``: SRFlow-style levels of ActNorm,
invertible 1x1 convolution, affine injector and conditional affine coupling), reused as it is, with:

- the density of the map itself, ``x0 (B,1,S,S)``, instead of FTDDM's ``x_Ttrunc``;
- the condition ``c = [y, x_munet] (B,5,S,S)``: the four channels of ``y`` (zero-filled map, M, T1,
  FLAIR: the publication's enhancer sees MUNet's output and the MRIs) and MUNet's estimate cut by M
  (``enhancer_condition``);
- a learnable, unconditional base distribution ``z ~ N(mu, sigma)`` (``prior="learned"``), which the
  publication introduces; sampling draws ``z = mu + tau * sigma * eps``.

Training (``training.objectives.flow_enhancer_objective``): ``NLL(x0 | c) + lambda * L_guide`` with the
guide loss of FTDDM's flow (L1 + MS-SSIM at ``tau = 0``, inside M), MUNet frozen. The publication also adds
a k-space data-consistency loss; here data consistency is applied to the sampled output by the pipeline
instead (our choice, as for every sampler). Sizes: the ``paper`` preset is a 10.1 M-parameter flow, so that
MUNet + flow total the 37.6 M of the FTDDM paper's Table 1 (which we read as counting both networks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ftddm_trt.constants import COND_CHANNELS
from ftddm_trt.models.config import FlowConfig
from ftddm_trt.models.flow import ConditionalFlow


@dataclass(frozen=True)
class FlowEnhancerConfig(FlowConfig):
    """``FlowConfig`` of the enhancer's flow: condition ``[y, x_munet]`` (5 channels), learned prior.

    Presets as ``FlowConfig``'s (``tiny`` at 16 px, the MUNet tiny preset's size), ``paper`` smaller than
    FTDDM's flow (see the module docstring)."""

    cond_in_channels: int = COND_CHANNELS + 1
    prior: str = "learned"

    @classmethod
    def preset(cls, name: str) -> "FlowEnhancerConfig":
        """The sizes of preset ``name``: ``paper`` (about 10 M parameters), ``cpu`` or ``tiny`` (tests)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown flow enhancer preset {name!r}; choose from {cls.PRESETS}")
        base = FlowConfig.preset(name).to_dict()
        base.update(cond_in_channels=COND_CHANNELS + 1, prior="learned")
        if name == "paper":
            base.update(steps_per_level=8, coupling_hidden=208, injector_hidden=208, cond_channels=64)
        if name == "tiny":
            base.update(image_size=16)
        return cls.from_dict(base)


def enhancer_condition(y: Tensor, x_munet: Tensor) -> Tensor:
    """The flow's condition ``[y, x_munet * M]`` ``(B,5,S,S)`` from ``y`` ``(B,4,S,S)`` and MUNet's estimate
    ``(B,1,S,S)``."""
    return torch.cat([y, x_munet.to(y.dtype) * y[:, 1:2]], dim=1)


class FlowEnhancer(ConditionalFlow):
    """FTDDM's conditional flow over ``x0`` given ``enhancer_condition(y, x_munet)``; see the module docstring.

    ``forward`` / ``nll`` / ``reverse`` take the 5-channel condition; ``enhance`` takes ``y`` and MUNet's
    estimate separately."""

    def __init__(self, config: FlowEnhancerConfig | None = None) -> None:
        cfg = config or FlowEnhancerConfig()
        if cfg.cond_in_channels != COND_CHANNELS + 1:
            raise ValueError(f"the flow enhancer's condition has {COND_CHANNELS + 1} channels, "
                             f"got cond_in_channels={cfg.cond_in_channels}")
        super().__init__(cfg)

    def enhance(self, eps: Tensor, y: Tensor, x_munet: Tensor, tau: Tensor) -> Tensor:
        """Sharpened map ``(B,1,S,S)``: the reverse pass from unit-normal ``eps`` at temperature ``tau`` (B,)."""
        return self.reverse(eps, enhancer_condition(y, x_munet), tau)


class EnhancerReverse(nn.Module):
    """Export wrapper: ``forward(eps, y, x_munet, tau_f) = enhancer.enhance(...)`` (call ``eval()`` first)."""

    def __init__(self, enhancer: FlowEnhancer) -> None:
        super().__init__()
        self.enhancer = enhancer

    def forward(self, eps: Tensor, y: Tensor, x_munet: Tensor, tau_f: Tensor) -> Tensor:
        """The enhanced map ``(B,1,S,S)``."""
        return self.enhancer.enhance(eps, y, x_munet, tau_f)


__all__ = ["FlowEnhancerConfig", "FlowEnhancer", "EnhancerReverse", "enhancer_condition"]
