"""Denoising UNet of FTDDM: ADM / improved-DDPM layout with Conditional Instance Normalization.

``DenoisingUNet(config)(x_t, y, t, s) -> eps``: ``x_t (B,1,S,S)``, condition ``y (B,4,S,S)``,
timestep ``t (B,)`` float in [0, 1000], upscaling factor ``s (B,)`` float in [2, 8].

(t, s) conditioning, paper eq. 6: after the first convolution of every residual block
``f' = sigma_hat(t, s) * (f - mu(f)) / sigma(f) + mu_hat(t, s)`` (per channel, instance statistics).
``(sigma_hat, mu_hat)`` come from a 4-layer MLP with SiLU between the layers fed with
``[sinusoid(t), sinusoid(s_embed_scale * s)]``. The first three layers are one trunk shared by every
block (``DenoisingUNet.cin_mlp``), the fourth is a per-block linear head (``CondInstanceNorm.head``);
the composition trunk -> SiLU -> head is exactly the paper's 4-layer MLP, and sharing the trunk keeps the
parameter count of the paper. ``sigma_hat = 1 + head[:C]`` so that an untrained head means identity scale.

Export notes: instance normalisation is ``F.instance_norm`` in fp32 (exported as ONNX
InstanceNormalization, native in TensorRT); attention is matmul/softmax in fp32 with the 1/sqrt(d) scale
split over q and k (fp16-overflow friendly); no data-dependent control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftddm_trt.models.config import UNetConfig


def sinusoidal_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """The ``dim // 2`` frequencies of the ADM sinusoidal embedding."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half).float()


def sinusoidal_embedding(x: Tensor, freqs: Tensor) -> Tensor:
    """``[cos(x * f), sin(x * f)]`` for ``x (B,)`` -> ``(B, 2 * len(freqs))``."""
    args = x.to(freqs.dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def instance_norm(h: Tensor, eps: float) -> Tensor:
    """Per-sample per-channel normalisation over H, W, computed in (at least) fp32."""
    if h.dtype in (torch.float16, torch.bfloat16):
        return F.instance_norm(h.float(), eps=eps).to(h.dtype)
    return F.instance_norm(h, eps=eps)


class InstanceNorm(nn.Module):
    """Instance norm with a learned per-channel affine (used where no (t, s) conditioning is needed)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, h: Tensor) -> Tensor:
        return instance_norm(h, self.eps) * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class CondInstanceNorm(nn.Module):
    """Conditional Instance Normalization (paper eq. 6); ``head`` is the 4th layer of the CIN MLP."""

    def __init__(self, channels: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.channels = channels
        self.head = nn.Linear(hidden, 2 * channels)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """``h (B,C,H,W)``, ``emb (B,hidden)`` = SiLU(trunk output)."""
        gb = self.head(emb)[:, :, None, None]
        sigma_hat = 1.0 + gb[:, : self.channels]
        mu_hat = gb[:, self.channels :]
        return instance_norm(h, self.eps) * sigma_hat + mu_hat


class ResBlock(nn.Module):
    """IN -> SiLU -> conv3x3 -> CIN(t, s) -> SiLU -> dropout -> conv3x3, plus a (1x1) skip."""

    def __init__(self, cin: int, cout: int, hidden: int, dropout: float, eps: float, zero_out: bool) -> None:
        super().__init__()
        self.norm1 = InstanceNorm(cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.cin = CondInstanceNorm(cout, hidden, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if zero_out:
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.cin(h, emb))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (ADM ``AttentionBlock``), zero-init projection."""

    def __init__(self, channels: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = InstanceNorm(channels, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        _, c, hh, ww = x.shape
        heads, d, n = self.num_heads, c // self.num_heads, hh * ww
        qkv = self.qkv(self.norm(x)).reshape(-1, 3, heads, d, n)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, N)
        scale = d**-0.25  # applied to q and k each: keeps fp16 logits small
        dtype = q.dtype
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        logits = torch.matmul((q * scale).transpose(-1, -2).to(acc), (k * scale).to(acc))  # (B, h, N, N)
        w = torch.softmax(logits, dim=-1).to(dtype)
        out = torch.matmul(v, w.transpose(-1, -2))  # (B, h, d, N)
        return x + self.proj(out.reshape(-1, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One ADM 'TimestepEmbedSequential' entry: a ResBlock with optional attention, or a resampler."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for layer in self.layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class DenoisingUNet(nn.Module):
    """eps_theta(x_t, y, t, s): ADM-style UNet conditioned on (t, s) through CIN (paper eq. 6)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        hid = cfg.cin_hidden
        eps = cfg.norm_eps
        self.register_buffer("freqs", sinusoidal_frequencies(cfg.embed_dim, cfg.max_period), persistent=False)
        # CIN MLP layers 1-3 (shared trunk); layer 4 is each block's CondInstanceNorm.head.
        self.cin_mlp = nn.Sequential(
            nn.Linear(2 * cfg.embed_dim, hid),
            nn.SiLU(),
            nn.Linear(hid, hid),
            nn.SiLU(),
            nn.Linear(hid, hid),
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, hid, cfg.dropout, eps, cfg.zero_init_blocks)

        ch = cfg.channels[0]
        self.input_blocks = nn.ModuleList([_Stage(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        res_px = cfg.image_size
        n_levels = len(cfg.channels)
        for level, c in enumerate(cfg.channels):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, c)]
                ch = c
                if res_px in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads, eps))
                self.input_blocks.append(_Stage(*layers))
                skip_chans.append(ch)
            if level < n_levels - 1:
                self.input_blocks.append(_Stage(Downsample(ch)))
                skip_chans.append(ch)
                res_px //= 2

        mid: list[nn.Module] = [res(ch, ch)]
        if cfg.mid_attention:
            mid.append(AttentionBlock(ch, cfg.num_heads, eps))
        mid.append(res(ch, ch))
        self.middle_block = _Stage(*mid)

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(n_levels)):
            c = cfg.channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), c)]
                ch = c
                if res_px in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads, eps))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res_px *= 2
                self.output_blocks.append(_Stage(*layers))

        self.out_norm = InstanceNorm(ch, eps)
        self.out_conv = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def embed(self, t: Tensor, s: Tensor) -> Tensor:
        """SiLU(trunk([sin(t), sin(s_embed_scale * s)])): the input of every block's CIN head."""
        e = torch.cat(
            [
                sinusoidal_embedding(t, self.freqs),
                sinusoidal_embedding(s * self.config.s_embed_scale, self.freqs),
            ],
            dim=1,
        )
        return F.silu(self.cin_mlp(e.to(self.cin_mlp[0].weight.dtype)))

    def forward(self, x_t: Tensor, y: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Predicted noise ``(B,1,64,64)`` for ``x_t`` ``(B,1,64,64)``, ``y`` ``(B,4,64,64)``, ``t``, ``s`` ``(B,)``."""
        emb = self.embed(t, s)
        h = torch.cat([x_t, y], dim=1)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["DenoisingUNet", "CondInstanceNorm", "count_parameters", "sinusoidal_embedding"]
