"""MUNet-FS-cWGAN baseline (Dong et al. 2022b, "Multi-scale super-resolution MRSI with adjustable
sharpness"): a multi-encoder UNet whose convolution filters are scaled by a small MLP of the upscaling
factor s ("Filter Scaling"), trained as a conditional Wasserstein GAN (``training.munet``). Written from
the publications' descriptions, not from their code.

``MUNet(config)``: ``forward(y (B,4,S,S), s (B,)) -> x0 (B,1,S,S)``, zero outside M, in one evaluation.
Inputs follow the regression yardstick's convention (``training.objectives.regression_predict``): the
zero-filled map cut by M, the rest of ``y`` (M, T1, FLAIR) and s.

- One encoder per input modality (``config.encoders``): ``"map"`` sees (zero-filled * M, M), ``"t1"`` sees
  (zero-filled * M, T1), ``"flair"`` sees (zero-filled * M, FLAIR): each MRI encoder pairs its image with
  the low-resolution map, as the publications' encoders take (map, MRI) pairs. Each encoder has
  ``depth`` poolings; the bottlenecks are concatenated, and every decoder stage concatenates the skips of
  every encoder at its resolution.
- Every 3x3 convolution of the encoders and the decoder is a ``FilterScaledConv2d``: its filter for
  output channel o and input channel i is ``w[o, i] * (1 + a[o, i](s))``, where ``a(s)`` is a linear head
  on a 4-layer LeakyReLU MLP of s (the "mapping" network). Each convolution is followed by
  InstanceNorm and PReLU, two convolutions per stage.
- Output: a 1x1 convolution, linear (the publication ends in a sigmoid for data in [0, 1]; our maps are
  normalized to [0, ~2]), times M. The publication's data-consistency layer is left to the sampling
  pipeline, which applies it to every sampler's output (``diffusion.consistency``).

``MUNetCritic(config)``: ``forward(x (B,1,S,S), y (B,4,S,S)) -> score (B,)`` (higher: more real). Three
stride-2 4x4 convolutions with LeakyReLU and no normalization (WGAN-GP penalizes per-sample gradients,
which batch statistics would couple; the publication uses instance normalization), then a linear layer.

Choices where the publications are silent or where we differ (on purpose):

- The mapping MLP is shared by every convolution (each keeps its own scaling head); the publication
  gives each convolution its own MLP. The scaling is ``1 + a(s)`` rather than ``a(s)``, so training
  starts near plain convolutions. (The 1 is the initial value of the head's bias; a separate ``1 +`` met a
  bug of the ONNX graph cleaner, onnxslim's Gemm + Add fusion, which dropped the input s.)
- Filter scaling with a different s for each image of a batch runs as an explicit im2col + batched
  matrix product (``FilterScaledConv2d``): exact, and exported to ONNX with a dynamic batch (a grouped
  convolution would fix the batch size in the graph).
- The critic is conditioned on ``y`` (not on s); the metabolite-name and adversarial-weight conditions
  of the MICCAI paper are not reproduced (one network serves every metabolite, at one adversarial weight).
- Sizes: the ``paper`` preset has 27.7 M generator parameters, near the 27.5 M of the FTDDM paper's
  Table 1; the original widths are not published in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftddm_trt.constants import COND_CHANNELS, HR_SIZE
from ftddm_trt.models.config import ConfigBase

#: The modality encoders MUNet can have, and the channels of ``y`` each one reads besides the map.
ENCODER_INPUTS: dict[str, int] = {"map": 1, "t1": 2, "flair": 3}


@dataclass(frozen=True)
class MUNetConfig(ConfigBase):
    """Sizes of the MUNet generator and its Wasserstein critic.

    ``features``: channels of the first stage (doubled at each of the ``depth`` poolings);
    ``latent_dim``: width of the mapping MLP of s and input of each filter-scaling head;
    ``encoders``: modality encoders (``ENCODER_INPUTS``); ``critic_width``: the critic's first width.
    """

    image_size: int = HR_SIZE
    cond_channels: int = COND_CHANNELS
    features: int = 36
    depth: int = 3
    latent_dim: int = 32
    encoders: tuple[str, ...] = ("map", "t1", "flair")
    critic_width: int = 64
    leaky_slope: float = 0.2

    def __post_init__(self) -> None:
        if self.depth < 1 or self.image_size % (2 ** (self.depth + 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**(depth + 1) (a bottleneck of at "
                             f"least 2 x 2 px), depth {self.depth}")
        if self.image_size % 8:
            raise ValueError(f"image_size {self.image_size} must be divisible by 8 (the critic's three strides)")
        if not self.encoders or any(e not in ENCODER_INPUTS for e in self.encoders) or len(set(self.encoders)) != len(
            self.encoders
        ):
            raise ValueError(f"encoders must be distinct names of {tuple(ENCODER_INPUTS)}, got {self.encoders}")
        if min(self.features, self.latent_dim, self.critic_width) < 1:
            raise ValueError(f"bad MUNet sizes: {self}")

    @classmethod
    def preset(cls, name: str) -> "MUNetConfig":
        """The sizes of preset ``name``: ``paper`` (27.7 M generator parameters), ``cpu`` or ``tiny`` (tests)."""
        if name == "paper":
            return cls()
        if name == "cpu":
            return cls(features=12, depth=3, latent_dim=16, critic_width=16)
        if name == "tiny":
            return cls(image_size=16, features=4, depth=2, latent_dim=4, critic_width=4)
        raise ValueError(f"unknown MUNet preset {name!r}; choose from {cls.PRESETS}")


def im2col(x: Tensor, k: int) -> Tensor:
    """(B, C, H, W) -> (B, C*k*k, H*W): the k x k neighbourhoods (zero padding, stride 1), channel-major
    then kernel row, kernel column: the order of a conv weight ``(O, C, k, k)`` flattened."""
    p = k // 2
    h, w = x.shape[2], x.shape[3]
    xp = F.pad(x, (p, p, p, p))
    cols = torch.stack([xp[:, :, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)], dim=2)
    return cols.reshape(x.shape[0], x.shape[1] * k * k, h * w)


class FilterScaledConv2d(nn.Module):
    """k x k convolution (stride 1, same padding, no bias) whose filter ``w[o, i]`` is scaled per image by
    ``1 + a[o, i]``, ``a = head(code)``: ``forward(x (B,Cin,H,W), code (B,latent)) -> (B,Cout,H,W)``."""

    def __init__(self, cin: int, cout: int, latent_dim: int, k: int = 3) -> None:
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, k
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default
        self.head = nn.Linear(latent_dim, cout * cin)
        with torch.no_grad():  # the head's bias holds the 1 of 1 + a(s): no separate Add in the graph
            self.head.bias.add_(1.0)

    def scales(self, code: Tensor) -> Tensor:
        """The per-image filter scales ``1 + a(code)``, (B, Cout, Cin) (the 1 lives in the head's bias)."""
        return self.head(code).reshape(-1, self.cout, self.cin)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        """The convolution of ``x`` with each image's own scaled filters."""
        h, w = x.shape[2], x.shape[3]
        weights = self.weight.unsqueeze(0) * self.scales(code).unsqueeze(-1).unsqueeze(-1)  # (B,O,I,k,k)
        out = torch.bmm(weights.reshape(-1, self.cout, self.cin * self.k * self.k), im2col(x, self.k))
        return out.reshape(-1, self.cout, h, w)


class _Stage(nn.Module):
    """Two (filter-scaled 3x3 conv -> InstanceNorm -> PReLU) layers."""

    def __init__(self, cin: int, cout: int, latent_dim: int) -> None:
        super().__init__()
        self.conv1 = FilterScaledConv2d(cin, cout, latent_dim)
        self.conv2 = FilterScaledConv2d(cout, cout, latent_dim)
        self.norm1, self.norm2 = nn.InstanceNorm2d(cout), nn.InstanceNorm2d(cout)
        self.act1, self.act2 = nn.PReLU(cout), nn.PReLU(cout)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.conv1(x, code)))
        return self.act2(self.norm2(self.conv2(x, code)))


class _Encoder(nn.Module):
    def __init__(self, cin: int, cfg: MUNetConfig) -> None:
        super().__init__()
        widths = [cfg.features * 2**i for i in range(cfg.depth + 1)]
        self.stages = nn.ModuleList()
        for w in widths:
            self.stages.append(_Stage(cin, w, cfg.latent_dim))
            cin = w

    def forward(self, x: Tensor, code: Tensor) -> list[Tensor]:
        """Features at every resolution, finest first; the last is the bottleneck."""
        feats = []
        for i, stage in enumerate(self.stages):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x, code)
            feats.append(x)
        return feats


def mapping_mlp(latent_dim: int, slope: float) -> nn.Sequential:
    """The mapping network of s: four linear layers with LeakyReLU, (B, 1) -> (B, latent_dim)."""
    layers: list[nn.Module] = []
    cin = 1
    for _ in range(4):
        layers += [nn.Linear(cin, latent_dim), nn.LeakyReLU(slope)]
        cin = latent_dim
    return nn.Sequential(*layers)


class MUNet(nn.Module):
    """Multi-encoder UNet with filter scaling on s: ``forward(y, s) -> x0 (B,1,S,S)`` (see the module docstring)."""

    def __init__(self, config: MUNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or MUNetConfig()
        self.config = cfg
        self.mapping = mapping_mlp(cfg.latent_dim, cfg.leaky_slope)
        self.encoders = nn.ModuleList(_Encoder(2, cfg) for _ in cfg.encoders)
        n = len(cfg.encoders)
        widths = [cfg.features * 2**i for i in range(cfg.depth + 1)]
        self.ups = nn.ModuleList()
        self.stages = nn.ModuleList()
        below = n * widths[-1]  # the concatenated bottlenecks
        for w in reversed(widths[:-1]):
            self.ups.append(nn.Conv2d(below, w, 3, padding=1))
            self.stages.append(_Stage((n + 1) * w, w, cfg.latent_dim))
            below = w
        self.out = nn.Conv2d(widths[0], 1, 1)

    def encoder_inputs(self, y: Tensor) -> list[Tensor]:
        """Each encoder's 2-channel input: (zero-filled * M, M / T1 / FLAIR)."""
        mask = y[:, 1:2]
        lowres = y[:, 0:1] * mask
        return [torch.cat([lowres, y[:, ENCODER_INPUTS[e] : ENCODER_INPUTS[e] + 1]], dim=1)
                for e in self.config.encoders]

    def forward(self, y: Tensor, s: Tensor) -> Tensor:
        """x0 estimate ``(B,1,S,S)``, zero outside M, for condition ``y`` ``(B,4,S,S)`` and factors ``s`` ``(B,)``."""
        code = self.mapping(s.to(y.dtype).unsqueeze(1))
        feats = [enc(x, code) for enc, x in zip(self.encoders, self.encoder_inputs(y))]
        depth = self.config.depth
        h = torch.cat([f[depth] for f in feats], dim=1)
        for j, (up, stage) in enumerate(zip(self.ups, self.stages)):
            level = depth - 1 - j
            h = up(F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False))
            h = stage(torch.cat([h, *(f[level] for f in feats)], dim=1), code)
        return self.out(h) * y[:, 1:2]


class MUNetCritic(nn.Module):
    """Conditional Wasserstein critic: ``forward(x, y) -> (B,)`` scores (see the module docstring)."""

    def __init__(self, config: MUNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or MUNetConfig()
        self.config = cfg
        w = cfg.critic_width
        layers: list[nn.Module] = []
        cin = 1 + cfg.cond_channels
        for cout in (w, 2 * w, 4 * w):  # S -> S/2 -> S/4 -> S/8
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(cfg.leaky_slope)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(cin * (cfg.image_size // 8) ** 2, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Scores ``(B,)`` of ``x`` ``(B,1,S,S)`` as a real map for condition ``y`` ``(B,4,S,S)``."""
        h = self.features(torch.cat([x, y.to(x.dtype)], dim=1))
        return self.score(h.flatten(1)).squeeze(1)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor, y: Tensor, alpha: Tensor) -> Tensor:
    """WGAN-GP term (Gulrajani et al. 2017): ``mean_b (||grad_x critic(x_hat_b, y_b)||_2 - 1)^2`` at
    ``x_hat = alpha * real + (1 - alpha) * fake`` (``alpha`` (B,) in [0, 1]); differentiable in the critic's
    parameters (``create_graph``). real, fake: (B,1,S,S); y: (B,4,S,S). Returns a scalar."""
    a = alpha.to(real.dtype).reshape(-1, 1, 1, 1)
    x_hat = (a * real.detach() + (1.0 - a) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat, y)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


__all__ = ["MUNetConfig", "MUNet", "MUNetCritic", "FilterScaledConv2d", "gradient_penalty", "im2col",
           "mapping_mlp", "ENCODER_INPUTS"]
