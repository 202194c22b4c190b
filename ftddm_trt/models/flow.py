"""Conditional normalizing flow of FTDDM (SRFlow-style; written from the ideas, not the code).

``ConditionalFlow(config)`` maps a noisy image ``x (B,C,S,S)`` (``x_Ttrunc``) and its condition
``y (B,4,S,S)`` to a packed unit-normal latent ``eps (B,C,S,S)`` and back.

Layout (``FlowConfig``), from the image side:

1. ``initial_steps`` x (ActNorm, AffineInjector) at full resolution (a 1-channel image cannot couple).
2. For each of ``levels`` levels: Squeeze (C -> 4C, S -> S/2), a transition (ActNorm, Inv1x1Conv), then
   ``steps_per_level`` x (ActNorm, Inv1x1Conv, AffineInjector, conditional AffineCoupling); after every
   level but the last a Split sends half of the channels out as that level's latent ``z_l``.
   For a 1x64x64 image and 3 levels: z = 2x32x32 + 4x16x16 + 16x8x8 = 4096 values.
3. Prior ``z_l ~ N(mu_l(y), sigma_l(y))`` (``prior="conditional"``: a zero-initialised conv head on the
   level's condition features, so the prior starts at N(0, I)), or unconditional learned tensors
   (``prior="learned"``). ``log sigma`` is soft-bounded to ``+-log_sigma_bound`` with tanh.
   The standardisation ``eps_l = (z_l - mu_l) / sigma_l`` is treated as the last layer of the flow:
   ``forward`` returns ``eps`` and a ``logdet`` that includes ``-sum log sigma``.

The condition net turns ``y`` into ``cond_channels`` features at every resolution (full, /2, /4, ...):
3x3 convs + LeakyReLU, each stage after the first starting with a strided (stride 2) conv.

Scales of the injector and the coupling are ``sigmoid(h + scale_offset) + scale_eps`` (in (0, 1], never 0),
their nets end in a zero-initialised conv, ActNorm starts at identity (``data_init`` offers an optional,
deterministic data-dependent initialisation done once, outside ``forward``).

Invertible 1x1 convolutions keep their weight ``W`` as a parameter. In ``train()`` mode the forward uses
``slogdet(W)`` and the reverse ``inv(W)`` (both differentiable: the guide loss backpropagates through the
reverse). In ``eval()`` mode both use buffers computed by ``refresh_inverse()`` (float64 inversion), which
is called by ``eval()``, ``.to()/.double()``, ``load_state_dict`` and ``models.io.load_model``. So an
exported (eval) reverse graph holds no ``inverse``/``linalg`` op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftddm_trt.models.config import FlowConfig

# ----------------------------------------------------------------------------------------- helpers


def squeeze2d(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block becomes 4 channels."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    x = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(-1, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: Tensor) -> Tensor:
    """Inverse of ``squeeze2d``."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    x = x.reshape(-1, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(-1, c // 4, 2 * h, 2 * w)


def _sum_chw(x: Tensor) -> Tensor:
    return x.sum(dim=(1, 2, 3))


def _zero_conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _cond_net(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-init conv3x3 (the coupling/injector sub-network)."""
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        _zero_conv(hidden, cout),
    )


# ------------------------------------------------------------------------------------------ layers


class ActNorm(nn.Module):
    """Per-channel affine ``(x + bias) * exp(logs)``, identity at initialisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor, logdet: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, logdet + H * W * sum(logs))`` for ``x`` ``(B, C, H, W)``."""
        hw = x.shape[2] * x.shape[3]
        return (x + self.bias) * torch.exp(self.logs), logdet + self.logs.sum() * hw

    def reverse(self, x: Tensor) -> Tensor:
        """The inverse: ``x * exp(-logs) - bias``."""
        return x * torch.exp(-self.logs) - self.bias

    @torch.no_grad()
    def init_from(self, x: Tensor, eps: float = 1e-6) -> None:
        """Set bias/logs so that ``x`` comes out zero-mean unit-variance per channel."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + eps))


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution; eval-mode inverse and log|det| are buffers (see module docstring)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        self.weight = nn.Parameter(w.float())
        self.register_buffer("weight_inv", torch.eye(channels), persistent=False)
        self.register_buffer("logabsdet", torch.zeros(()), persistent=False)
        self.refresh_inverse()

    @torch.no_grad()
    def refresh_inverse(self) -> None:
        """Recompute the inverse weight and log|det| buffers from the current weight (in float64)."""
        w = self.weight.detach().to(torch.float64)
        self.weight_inv.copy_(torch.linalg.inv(w).to(self.weight_inv.dtype))
        self.logabsdet.copy_(torch.linalg.slogdet(w)[1].to(self.logabsdet.dtype))

    def forward(self, x: Tensor, logdet: Tensor) -> tuple[Tensor, Tensor]:
        """``(W x, logdet + H * W * log|det W|)``; in eval mode log|det| comes from the buffer."""
        lad = torch.linalg.slogdet(self.weight)[1] if self.training else self.logabsdet
        c = self.weight.shape[0]
        out = F.conv2d(x, self.weight.reshape(c, c, 1, 1))
        return out, logdet + lad * (x.shape[2] * x.shape[3])

    def reverse(self, x: Tensor) -> Tensor:
        """The inverse ``W^-1 x`` (the buffered inverse in eval mode)."""
        w_inv = torch.linalg.inv(self.weight) if self.training else self.weight_inv
        c = self.weight.shape[0]
        return F.conv2d(x, w_inv.reshape(c, c, 1, 1))


class _ConditionalAffine(nn.Module):
    """Shared scale rule: ``scale = sigmoid(raw + offset) + eps``."""

    def __init__(self, offset: float, eps: float) -> None:
        super().__init__()
        self.offset = offset
        self.eps = eps

    def _shift_scale(self, out: Tensor, c: int) -> tuple[Tensor, Tensor]:
        shift = out[:, :c]
        scale = torch.sigmoid(out[:, c:] + self.offset) + self.eps
        return shift, scale


class AffineInjector(_ConditionalAffine):
    """``x' = (x + shift(cond)) * scale(cond)`` on every channel; the flow never sees x in the net."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, offset: float, eps: float) -> None:
        super().__init__(offset, eps)
        self.channels = channels
        self.net = _cond_net(cond_channels, hidden, 2 * channels)

    def forward(self, x: Tensor, logdet: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``((x + shift) * scale, logdet + sum log scale)`` with (shift, scale) from ``cond``."""
        shift, scale = self._shift_scale(self.net(cond), self.channels)
        return (x + shift) * scale, logdet + _sum_chw(torch.log(scale))

    def reverse(self, x: Tensor, cond: Tensor) -> Tensor:
        """The inverse: ``x / scale - shift``."""
        shift, scale = self._shift_scale(self.net(cond), self.channels)
        return x / scale - shift


class AffineCoupling(_ConditionalAffine):
    """Conditional affine coupling: ``xb' = (xb + shift) * scale`` with (shift, scale) = NN(xa, cond)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, offset: float, eps: float) -> None:
        super().__init__(offset, eps)
        self.ca = channels // 2
        self.cb = channels - self.ca
        self.net = _cond_net(self.ca + cond_channels, hidden, 2 * self.cb)

    def forward(self, x: Tensor, logdet: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``xa`` unchanged, ``xb`` transformed; returns ``(x', logdet + sum log scale)``."""
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, scale = self._shift_scale(self.net(torch.cat([xa, cond], dim=1)), self.cb)
        return torch.cat([xa, (xb + shift) * scale], dim=1), logdet + _sum_chw(torch.log(scale))

    def reverse(self, x: Tensor, cond: Tensor) -> Tensor:
        """The inverse: ``xb = xb' / scale - shift`` with (shift, scale) from ``(xa, cond)``."""
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, scale = self._shift_scale(self.net(torch.cat([xa, cond], dim=1)), self.cb)
        return torch.cat([xa, xb / scale - shift], dim=1)


class FlowStep(nn.Module):
    """ActNorm -> Inv1x1Conv -> AffineInjector -> conditional AffineCoupling (or a subset)."""

    def __init__(
        self, channels: int, cfg: FlowConfig, *, inv: bool = True, injector: bool = True, coupling: bool = True
    ) -> None:
        super().__init__()
        off, eps, cc = cfg.scale_offset, cfg.scale_eps, cfg.cond_channels
        self.actnorm = ActNorm(channels)
        self.inv = InvConv1x1(channels) if inv else None
        self.injector = AffineInjector(channels, cc, cfg.injector_hidden, off, eps) if injector else None
        self.coupling = AffineCoupling(channels, cc, cfg.coupling_hidden, off, eps) if coupling else None

    def forward(self, x: Tensor, logdet: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """The step's layers in order; returns ``(x', logdet')``."""
        x, logdet = self.actnorm(x, logdet)
        if self.inv is not None:
            x, logdet = self.inv(x, logdet)
        if self.injector is not None:
            x, logdet = self.injector(x, logdet, cond)
        if self.coupling is not None:
            x, logdet = self.coupling(x, logdet, cond)
        return x, logdet

    def reverse(self, x: Tensor, cond: Tensor) -> Tensor:
        """The step's layers inverted, in reverse order."""
        if self.coupling is not None:
            x = self.coupling.reverse(x, cond)
        if self.injector is not None:
            x = self.injector.reverse(x, cond)
        if self.inv is not None:
            x = self.inv.reverse(x)
        return self.actnorm.reverse(x)


class ConditionNet(nn.Module):
    """Condition features at full resolution and at every level (/2, /4, ...): convs + LeakyReLU."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        cc, slope = cfg.cond_channels, cfg.leaky_slope

        def stage(cin: int, stride: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cc, 3, stride=stride, padding=1), nn.LeakyReLU(slope)]
            for _ in range(cfg.cond_convs - 1):
                layers += [nn.Conv2d(cc, cc, 3, padding=1), nn.LeakyReLU(slope)]
            return nn.Sequential(*layers)

        self.stages = nn.ModuleList([stage(cfg.cond_in_channels, 1)])
        self.stages.extend(stage(cc, 2) for _ in range(cfg.levels))

    def forward(self, y: Tensor) -> list[Tensor]:
        """Features of ``y`` ``(B, 4, 64, 64)``: one tensor at full resolution, then one per level."""
        feats = []
        h = y
        for st in self.stages:
            h = st(h)
            feats.append(h)
        return feats


class LatentPrior(nn.Module):
    """(mu, log sigma) of one latent level, conditional on the level's features or learned tensors."""

    def __init__(self, shape: tuple[int, int, int], cfg: FlowConfig) -> None:
        super().__init__()
        self.channels = shape[0]
        self.bound = cfg.log_sigma_bound
        self.conditional = cfg.prior == "conditional"
        if self.conditional:
            self.net = nn.Sequential(
                nn.Conv2d(cfg.cond_channels, cfg.prior_hidden, 3, padding=1),
                nn.LeakyReLU(cfg.leaky_slope),
                _zero_conv(cfg.prior_hidden, 2 * shape[0]),
            )
        else:
            self.mu = nn.Parameter(torch.zeros(1, *shape))
            self.raw_log_sigma = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        if self.conditional:
            out = self.net(feat)
            mu, raw = out[:, : self.channels], out[:, self.channels :]
        else:
            mu, raw = self.mu, self.raw_log_sigma
        return mu, self.bound * torch.tanh(raw / self.bound)


# -------------------------------------------------------------------------------------------- flow


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    module.refresh_inverse()  # type: ignore[operator]


class ConditionalFlow(nn.Module):
    """SRFlow-style conditional flow: ``forward(x, y) -> (eps, logdet)``, ``reverse(eps, y, tau_f) -> x``."""

    def __init__(self, config: FlowConfig | None = None) -> None:
        super().__init__()
        cfg = config or FlowConfig()
        self.config = cfg
        self.latent_shapes = cfg.latent_shapes()
        self.cond_net = ConditionNet(cfg)
        self.initial = nn.ModuleList(
            FlowStep(cfg.in_channels, cfg, inv=False, coupling=False) for _ in range(cfg.initial_steps)
        )
        self.transitions = nn.ModuleList()
        self.levels = nn.ModuleList()
        c = cfg.in_channels
        for level in range(cfg.levels):
            c = 4 * c
            self.transitions.append(FlowStep(c, cfg, injector=False, coupling=False))
            self.levels.append(nn.ModuleList(FlowStep(c, cfg) for _ in range(cfg.steps_per_level)))
            if level < cfg.levels - 1:
                c = c // 2
        self.priors = nn.ModuleList(LatentPrior(shape, cfg) for shape in self.latent_shapes)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ---- packing -------------------------------------------------------------------------------

    @property
    def latent_sizes(self) -> list[int]:
        """Values in each latent level (finest first); together they fill one packed image (``pack_latents``)."""
        return [c * h * w for c, h, w in self.latent_shapes]

    def pack_latents(self, zs: list[Tensor]) -> Tensor:
        """Latent levels (finest first) -> one ``(B, in_channels, S, S)`` tensor (row-major concat)."""
        s = self.config.image_size
        flat = torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1)
        return flat.reshape(-1, self.config.in_channels, s, s)

    def unpack_latents(self, packed: Tensor) -> list[Tensor]:
        """Inverse of ``pack_latents``."""
        flat = packed.reshape(-1, sum(self.latent_sizes))
        parts = torch.split(flat, self.latent_sizes, dim=1)
        return [p.reshape(-1, *shape) for p, shape in zip(parts, self.latent_shapes)]

    # ---- core ----------------------------------------------------------------------------------

    def condition_features(self, y: Tensor) -> list[Tensor]:
        """``[full-res, level 1, ..., level L]`` condition features."""
        return self.cond_net(y)

    def priors_for(self, feats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(mu_l, log sigma_l) per latent level (batch 1 for the unconditional prior)."""
        return [prior(feats[i + 1]) for i, prior in enumerate(self.priors)]

    def encode(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """x -> (latent levels z_l, log|det dz/dx| (B,), condition features)."""
        feats = self.condition_features(y)
        logdet = x.new_zeros(x.shape[0])
        h = x
        for step in self.initial:
            h, logdet = step(h, logdet, feats[0])
        zs: list[Tensor] = []
        n = len(self.levels)
        for i in range(n):
            h = squeeze2d(h)
            h, logdet = self.transitions[i](h, logdet, feats[i + 1])
            for step in self.levels[i]:
                h, logdet = step(h, logdet, feats[i + 1])
            if i < n - 1:
                keep = h.shape[1] // 2
                zs.append(h[:, keep:])
                h = h[:, :keep]
        zs.append(h)
        return zs, logdet, feats

    def decode(self, zs: list[Tensor], feats: list[Tensor]) -> Tensor:
        """Inverse flow: latent levels -> x."""
        n = len(self.levels)
        h = zs[-1]
        for i in reversed(range(n)):
            if i < n - 1:
                h = torch.cat([h, zs[i]], dim=1)
            for step in reversed(self.levels[i]):
                h = step.reverse(h, feats[i + 1])
            h = self.transitions[i].reverse(h, feats[i + 1])
            h = unsqueeze2d(h)
        for step in reversed(self.initial):
            h = step.reverse(h, feats[0])
        return h

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B,C,S,S)``, ``y`` -> (packed eps = (z - mu)/sigma ``(B,C,S,S)``, log|det d eps/dx| ``(B,)``).

        The log-determinant includes the standardisation, ``-sum log sigma_z``.
        """
        zs, logdet, feats = self.encode(x, y)
        eps = []
        for z, (mu, log_sigma) in zip(zs, self.priors_for(feats)):
            eps.append((z - mu) * torch.exp(-log_sigma))
            logdet = logdet - _sum_chw(log_sigma.expand_as(z))
        return self.pack_latents(eps), logdet

    def nll(self, x: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood ``-log p(x | y)`` in nats per dimension, ``(B,)``."""
        eps, logdet = self(x, y)
        dims = eps.shape[1] * eps.shape[2] * eps.shape[3]
        log_pz = -0.5 * _sum_chw(eps * eps) - 0.5 * dims * math.log(2.0 * math.pi)
        return -(log_pz + logdet) / dims

    def reverse(self, eps: Tensor, y: Tensor, tau_f: Tensor) -> Tensor:
        """``z_l = mu_l(y) + tau_f * sigma_l(y) * eps_l``, then the inverse flow -> ``x (B,C,S,S)``."""
        feats = self.condition_features(y)
        tau = tau_f.to(eps.dtype).reshape(-1, 1, 1, 1)
        zs = [
            mu + tau * torch.exp(log_sigma) * e
            for e, (mu, log_sigma) in zip(self.unpack_latents(eps), self.priors_for(feats))
        ]
        return self.decode(zs, feats)

    def sample(self, y: Tensor, tau_f: float | Tensor = 0.9, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x ~ p(x | y)`` at temperature ``tau_f`` (eps from ``generator``)."""
        b, s = y.shape[0], self.config.image_size
        eps = torch.randn(b, self.config.in_channels, s, s, generator=generator, device=y.device, dtype=y.dtype)
        tau = torch.as_tensor(tau_f, dtype=y.dtype, device=y.device).expand(b)
        return self.reverse(eps, y, tau)

    # ---- maintenance -----------------------------------------------------------------------------

    @torch.no_grad()
    def refresh_inverse(self) -> None:
        """Recompute every Inv1x1Conv's inverse/log|det| buffers (after optimizer steps, loading, export)."""
        for m in self.modules():
            if isinstance(m, InvConv1x1) and m.weight.device.type != "meta":
                m.refresh_inverse()

    def train(self, mode: bool = True) -> "ConditionalFlow":
        """Switch to train / eval mode; entering eval refreshes the 1x1 convolutions' inverse buffers."""
        super().train(mode)
        if not mode:
            self.refresh_inverse()
        return self

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "latent_shapes"):  # skip during construction
            self.refresh_inverse()
        return out

    @torch.no_grad()
    def data_init(self, x: Tensor, y: Tensor) -> None:
        """Optional data-dependent ActNorm initialisation: one forward pass on a batch, done once.

        Each ActNorm is set so that its input on this batch leaves it zero-mean unit-variance. Plain
        parameter values afterwards: nothing in ``forward`` depends on it (export-safe).
        """
        hooks = []

        def pre(module: nn.Module, args: tuple) -> None:
            module.init_from(args[0])  # type: ignore[operator]

        for m in self.modules():
            if isinstance(m, ActNorm):
                hooks.append(m.register_forward_pre_hook(pre))
        try:
            self.encode(x, y)
        finally:
            for h in hooks:
                h.remove()


class FlowReverse(nn.Module):
    """Export wrapper: ``forward(eps, y, tau_f) = flow.reverse(eps, y, tau_f)`` (call ``eval()`` first)."""

    def __init__(self, flow: ConditionalFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, eps: Tensor, y: Tensor, tau_f: Tensor) -> Tensor:
        """``flow.reverse(eps, y, tau_f)``: x_Ttrunc ``(B,1,64,64)``."""
        return self.flow.reverse(eps, y, tau_f)


__all__ = [
    "ConditionalFlow",
    "FlowReverse",
    "ActNorm",
    "InvConv1x1",
    "AffineInjector",
    "AffineCoupling",
    "ConditionNet",
    "squeeze2d",
    "unsqueeze2d",
]
