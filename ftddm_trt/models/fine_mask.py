"""A learned estimate of the 64x64 quality mask from what an ``lr`` user has (the fine-mask estimator).

In the ``lr`` protocol the user's mask M is coarse (N x N qc maps, dilated), while the acquisition saw
the map cut by the *fine* quality mask. The qc consistency step (``diffusion.consistency.
partial_consistency``) puts the acquired band back through an estimate of that fine mask; with the
true mask it is worth several dB, with the qc-derived estimate F (``data.masks.fine_mask_estimate``)
little, because F's errors lie where the output is large. This small UNet reads the zero-filled map,
M, T1, FLAIR and the qc maps relative to their own median, so any qc convention
(``data.masks.fine_mask_features``), and returns, per pixel, the
probability that it lies in the fine quality mask; :meth:`FineMaskNet.mask` thresholds it high, since a
pixel wrongly kept (just outside the true mask's border) costs the step far more than one wrongly dropped.

Plain convolutions (no time or scale embedding: s is an input channel), one stage per entry of
``channels``, average-pool down and nearest up, skip connections by concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ftddm_trt.constants import (  # not data.masks: models must load without scipy (GPU check host)
    FINE_MASK_FEATURES,
    FINE_MASK_FEATURES_VERSION,
)
from ftddm_trt.models.config import ConfigBase


@dataclass(frozen=True)
class FineMaskConfig(ConfigBase):
    """Sizes of the estimator and how its probabilities are used.

    threshold: a pixel counts as inside the fine mask when its probability exceeds this.
    consistency_weight: the share ``w`` of the acquired band the qc consistency step puts back through
        the thresholded mask.
    features_version: which ``data.masks.fine_mask_features`` it reads (``constants.FINE_MASK_FEATURES_VERSION``);
        files saved without it read version 1 (absolute qc values) and are not used.
    """

    PRESETS: ClassVar[tuple[str, ...]] = ("cpu", "tiny")

    in_channels: int = FINE_MASK_FEATURES
    channels: tuple[int, ...] = (24, 48, 96)
    groups: int = 8
    threshold: float = 0.8
    consistency_weight: float = 0.5
    features_version: int = 1

    @property
    def current_features(self) -> bool:
        """Whether it reads the features ``data.masks.fine_mask_features`` computes now."""
        return self.features_version == FINE_MASK_FEATURES_VERSION

    def __post_init__(self) -> None:
        if not self.channels or any(c % self.groups for c in self.channels):
            raise ValueError(f"every entry of channels {self.channels} must be a multiple of groups={self.groups}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.consistency_weight <= 1.0:
            raise ValueError(f"consistency_weight must be in [0, 1], got {self.consistency_weight}")

    @classmethod
    def preset(cls, name: str) -> "FineMaskConfig":
        """``"cpu"``: about 0.27 M parameters; ``"tiny"``: unit-test size."""
        if name == "cpu":
            return cls(features_version=FINE_MASK_FEATURES_VERSION)
        if name == "tiny":
            return cls(channels=(8, 16), groups=4, features_version=FINE_MASK_FEATURES_VERSION)
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(cls.PRESETS)}")


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())


class FineMaskNet(nn.Module):
    """features (B, 8, H, W) -> logits (B, 1, H, W); H, W divisible by ``2 ** (len(channels) - 1)``."""

    def __init__(self, config: FineMaskConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        self.down = nn.ModuleList(_block(a, b, config.groups) for a, b in zip((config.in_channels, *ch[:-1]), ch))
        self.up = nn.ModuleList(_block(ch[i + 1] + ch[i], ch[i], config.groups) for i in reversed(range(len(ch) - 1)))
        self.out = nn.Conv2d(ch[0], 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` of the fine mask from the features ``(B, 8, H, W)``."""
        skips = []
        h = features
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.avg_pool2d(h, 2))
            skips.append(h)
        skips.pop()
        for block in self.up:
            h = block(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skips.pop()], dim=1))
        return self.out(h)

    @torch.no_grad()
    def mask(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float 0/1: probability above ``config.threshold``, cut by M (features channel 1)."""
        prob = torch.sigmoid(self(features))
        return (prob > self.config.threshold).to(features.dtype) * features[:, 1:2]
