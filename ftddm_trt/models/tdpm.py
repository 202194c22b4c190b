"""TDPM baseline (Zheng et al. 2023, "Truncated diffusion probabilistic models"): an adversarially trained
conditional generator draws x_Ttrunc, then the same truncated UNet chain as FTDDM denoises it.

The generator has the flow's interface, so every backend, the ONNX export and the pipeline serve it in the
flow's place (``ModelSet.open(..., start="tdpm")``):

- ``TDPMGenerator.reverse(eps (B,1,64,64), y (B,4,64,64), tau_f (B,)) -> x_Ttrunc (B,1,64,64)``:
  the latent is ``z = tau_f * eps`` (unit-normal ``eps``), concatenated with the condition ``y`` and
  mapped by a small convolutional encoder-decoder with skip connections. The output is in the units of
  ``x_Ttrunc = sqrt(gamma) x0 + sqrt(1 - gamma) M eps`` (the caller multiplies by M).
- ``TDPMDiscriminator(x (B,1,64,64), y (B,4,64,64)) -> logits (B,1,8,8)``: a conditional PatchGAN
  (three stride-2 convolutions), used only in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ftddm_trt.constants import COND_CHANNELS
from ftddm_trt.models.config import ConfigBase


@dataclass(frozen=True)
class TDPMConfig(ConfigBase):
    """Sizes of the TDPM generator and its discriminator. ``width``: channels at 64x64 (doubled at each of
    the two downsamplings); ``res_blocks``: residual blocks at 16x16; ``disc_width``: the discriminator's
    first width. Presets: ``cpu`` (~0.3 M generator parameters), ``tiny`` (tests), ``paper`` (a GPU-size
    generator; the TDPM paper's own sizes are not reproduced)."""

    width: int = 64
    res_blocks: int = 4
    disc_width: int = 64
    cond_channels: int = COND_CHANNELS

    def __post_init__(self) -> None:
        if min(self.width, self.disc_width) < 1 or self.res_blocks < 0:
            raise ValueError(f"bad TDPM sizes: {self}")

    @classmethod
    def preset(cls, name: str) -> "TDPMConfig":
        """The sizes of preset ``name``: ``paper``, ``cpu`` or ``tiny`` (tests)."""
        if name == "paper":
            return cls()
        if name == "cpu":
            return cls(width=24, res_blocks=3, disc_width=24)
        if name == "tiny":
            return cls(width=4, res_blocks=1, disc_width=4)
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class TDPMGenerator(nn.Module):
    """``reverse(eps, y, tau_f) -> x_Ttrunc``; see the module docstring."""

    def __init__(self, config: TDPMConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.stem = nn.Conv2d(1 + config.cond_channels, w, 3, padding=1)
        self.down1 = nn.Sequential(_Res(w), nn.Conv2d(w, 2 * w, 4, stride=2, padding=1))  # 64 -> 32
        self.down2 = nn.Sequential(_Res(2 * w), nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1))  # 32 -> 16
        self.mid = nn.Sequential(*[_Res(4 * w) for _ in range(config.res_blocks)])
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(4 * w, 2 * w, 3, padding=1))
        self.fuse2 = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 1), _Res(2 * w))
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(2 * w, w, 3, padding=1))
        self.fuse1 = nn.Sequential(nn.Conv2d(2 * w, w, 1), _Res(w))
        self.head = nn.Sequential(_norm(w), nn.SiLU(), nn.Conv2d(w, 1, 3, padding=1))

    def reverse(self, eps: Tensor, y: Tensor, tau_f: Tensor) -> Tensor:
        """x_Ttrunc ``(B,1,64,64)`` generated from ``eps * tau_f`` and the condition ``y`` ``(B,4,64,64)``."""
        z = eps * tau_f.to(eps.dtype).view(-1, 1, 1, 1)
        h0 = self.stem(torch.cat([z, y.to(eps.dtype)], dim=1))
        h1 = self.down1(h0)
        h2 = self.mid(self.down2(h1))
        u1 = self.fuse2(torch.cat([self.up2(h2), h1], dim=1))
        u0 = self.fuse1(torch.cat([self.up1(u1), h0], dim=1))
        return self.head(u0)

    def forward(self, eps: Tensor, y: Tensor, tau_f: Tensor) -> Tensor:
        """Same as ``reverse`` (the exported graph)."""
        return self.reverse(eps, y, tau_f)


class TDPMDiscriminator(nn.Module):
    """Conditional PatchGAN: ``(x, y) -> (B, 1, 8, 8)`` logits (real high)."""

    def __init__(self, config: TDPMConfig) -> None:
        super().__init__()
        self.config = config
        w = config.disc_width
        layers: list[nn.Module] = []
        c_in = 1 + config.cond_channels
        for c_out in (w, 2 * w, 4 * w):  # 64 -> 32 -> 16 -> 8
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits ``(B, 1, 8, 8)`` that ``x`` ``(B,1,64,64)`` is a real x_Ttrunc for ``y``."""
        return self.net(torch.cat([x, y.to(x.dtype)], dim=1))


__all__ = ["TDPMConfig", "TDPMGenerator", "TDPMDiscriminator"]
