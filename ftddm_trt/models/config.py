"""Typed configurations of the two networks of FTDDM (denoising UNet and conditional flow).

Each config is a frozen dataclass with ``to_dict()`` / ``from_dict()`` (JSON-safe: tuples become lists
and back) and ``preset(name)`` for the named sizes:

- ``"paper"``: the sizes of Dong et al. 2024 (UNet ~30 M parameters, flow ~20 M).
- ``"cpu"``: small networks that train on a 2-core CPU (UNet ~2.0 M, flow ~0.44 M).
- ``"tiny"``: unit-test sizes (forward in a few ms).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ftddm_trt.constants import COND_CHANNELS, HR_SIZE

_C = TypeVar("_C", bound="ConfigBase")


def _to_json(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_to_json(x) for x in v]
    return v


class ConfigBase:
    """Base of the network config dataclasses (``UNetConfig``, ``FlowConfig``, ``TDPMConfig``,
    ``FineMaskConfig``): ``to_dict`` / ``from_dict`` as ``NAME.json`` stores them, and ``replace``."""

    PRESETS: ClassVar[tuple[str, ...]] = ("paper", "cpu", "tiny")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples become lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """The config of ``to_dict``'s output; ValueError naming fields the class does not have."""
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        # every sequence field is a tuple of ints: JSON lists come back as tuples
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class UNetConfig(ConfigBase):
    """ADM-style denoising UNet with Conditional Instance Normalization on (t, s).

    ``channels`` gives one stage per entry (the first at ``image_size`` px, each next one at half the
    resolution); ``attention_resolutions`` are pixel sizes (16, 8) where self-attention follows each
    residual block. ``embed_dim`` is the width of each sinusoidal embedding (t and s each), ``cin_hidden``
    the width of the CIN MLP. ``s_embed_scale``: s enters as the sinusoidal embedding of
    ``s_embed_scale * s`` (100 * s spans 200..800, the same range as t).
    """

    in_channels: int = 1 + COND_CHANNELS
    out_channels: int = 1
    image_size: int = HR_SIZE
    channels: tuple[int, ...] = (64, 128, 192, 256)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    mid_attention: bool = True
    embed_dim: int = 64
    cin_hidden: int = 256
    s_embed_scale: float = 100.0
    max_period: float = 10000.0
    dropout: float = 0.0
    norm_eps: float = 1e-5
    zero_init_blocks: bool = False

    def __post_init__(self) -> None:
        n = len(self.channels)
        if n < 1 or self.image_size % (2 ** (n - 1)):
            raise ValueError(f"image_size {self.image_size} not divisible by 2**{n - 1}")
        if self.embed_dim % 2:
            raise ValueError("embed_dim must be even")
        for c in self.channels:
            if c % self.num_heads:
                raise ValueError(f"channels {c} not divisible by num_heads {self.num_heads}")

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        """The sizes of preset ``name``: ``paper``, ``cpu`` (about 2 M parameters) or ``tiny`` (tests)."""
        if name == "paper":
            return cls()
        if name == "cpu":
            # ~2.0 M parameters; attention only at 8x8 (16x16 attention costs ~20% of a CPU step)
            return cls(
                channels=(16, 32, 64, 96),
                num_res_blocks=1,
                attention_resolutions=(8,),
                embed_dim=32,
                cin_hidden=128,
            )
        if name == "tiny":
            return cls(
                image_size=16,
                channels=(8, 16),
                num_res_blocks=1,
                attention_resolutions=(8,),
                num_heads=2,
                embed_dim=8,
                cin_hidden=16,
            )
        raise ValueError(f"unknown UNet preset {name!r}; choose from {cls.PRESETS}")


@dataclass(frozen=True)
class FlowConfig(ConfigBase):
    """SRFlow-style conditional normalizing flow for ``x (B, in_channels, S, S)`` given ``y``.

    ``initial_steps`` (ActNorm, AffineInjector) steps at full resolution, then ``levels`` levels of
    Squeeze -> (ActNorm, Inv1x1) -> ``steps_per_level`` x (ActNorm, Inv1x1, AffineInjector,
    conditional AffineCoupling), with a Split (half of the channels become latent) after every level but
    the last. The condition net maps ``y`` to ``cond_channels`` features at every resolution
    (full, /2, /4, ...) with ``cond_convs`` 3x3 conv + LeakyReLU per stage (a strided one first).
    ``prior``: ``"conditional"`` (mu_z, log sigma_z from a zero-initialised conv head on each level's
    condition features) or ``"learned"`` (unconditional learned tensors).
    """

    in_channels: int = 1
    cond_in_channels: int = COND_CHANNELS
    image_size: int = HR_SIZE
    levels: int = 3
    steps_per_level: int = 12
    initial_steps: int = 2
    coupling_hidden: int = 256
    injector_hidden: int = 256
    cond_channels: int = 70  # 70: the paper preset lands at 20.2 M (UNet + flow = 50.5 M as in the paper)
    cond_convs: int = 3
    prior: str = "conditional"
    prior_hidden: int = 64
    scale_offset: float = 2.0
    scale_eps: float = 1e-4
    log_sigma_bound: float = 5.0
    leaky_slope: float = 0.2

    def __post_init__(self) -> None:
        if self.levels < 1 or self.image_size % (2**self.levels):
            raise ValueError(f"image_size {self.image_size} not divisible by 2**{self.levels}")
        if self.prior not in ("conditional", "learned"):
            raise ValueError(f"prior must be 'conditional' or 'learned', got {self.prior!r}")
        if self.cond_convs < 1:
            raise ValueError("cond_convs must be >= 1")

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent level, finest first; their sizes sum to in_channels*S*S."""
        shapes = []
        c, s = self.in_channels, self.image_size
        for level in range(self.levels):
            c, s = 4 * c, s // 2
            if level < self.levels - 1:
                shapes.append((c - c // 2, s, s))
                c = c // 2
            else:
                shapes.append((c, s, s))
        return shapes

    @classmethod
    def preset(cls, name: str) -> "FlowConfig":
        """The sizes of preset ``name``: ``paper``, ``cpu`` or ``tiny`` (tests)."""
        if name == "paper":
            return cls()
        if name == "cpu":
            return cls(
                steps_per_level=4,
                initial_steps=1,
                coupling_hidden=48,
                injector_hidden=32,
                cond_channels=24,
                cond_convs=1,
                prior_hidden=24,
            )
        if name == "tiny":
            return cls(
                image_size=8,
                levels=2,
                steps_per_level=2,
                initial_steps=1,
                coupling_hidden=8,
                injector_hidden=8,
                cond_channels=8,
                cond_convs=1,
                prior_hidden=8,
            )
        raise ValueError(f"unknown flow preset {name!r}; choose from {cls.PRESETS}")


__all__ = ["UNetConfig", "FlowConfig"]
