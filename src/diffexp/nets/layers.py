"""U-Net building blocks: time embedding, residual blocks, attention, resampling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


EMBEDDING_ORDERS = ("cos_sin", "sin_cos")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, order: str = "cos_sin",
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020): [cos(t w_i), sin(t w_i)] for
    ``order="cos_sin"`` ([sin, cos] for ``"sin_cos"``, the DDPM code's), w_i = max_period^(-i / (half - freq_shift)),
    i < half = dim // 2. DDPM's CIFAR-10 network uses sin_cos with freq_shift 1 (diffusers' ``flip_sin_to_cos=False,
    freq_shift=1``); diffexp's default is cos_sin with freq_shift 0 (``flip_sin_to_cos=True, freq_shift=0``)."""
    if order not in EMBEDDING_ORDERS:
        raise ValueError(f"net.time_embedding_order={order!r}; allowed: {list(EMBEDDING_ORDERS)}")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(f"net.time_freq_shift={freq_shift} must be below half the embedding width ({half})")
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts if order == "cos_sin" else parts[::-1], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with the time embedding injected in between.

    ``scale_shift``: h = norm(h) * (1 + scale) + shift (Dhariwal & Nichol 2021);
    otherwise h = h + proj(temb) before the second norm (Ho et al. 2020).
    With ``temb_dim=None`` there is no embedding (the autoencoder's blocks).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, dropout: float = 0.0, scale_shift: bool = True):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = None if temb_dim is None else nn.Linear(temb_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is None:
            h = self.norm2(h)
        elif self.scale_shift:
            emb = self.temb_proj(F.silu(temb))[:, :, None, None]
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.temb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, via scaled_dot_product_attention.

    The q/k/v and output projections act on the (N, H*W, C) token view as linear layers
    (equivalent to 1x1 convolutions, cheaper on CPU).
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: channels={channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (n, hw, c)
        q, k, v = self.qkv(tokens).reshape(n, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, hw, d)
        out = self.proj(out.transpose(1, 2).reshape(n, h * w, c))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class Downsample(nn.Module):
    """3x3 convolution with stride 2. ``padding=1``: one pixel on every side; ``padding=0``: one pixel on the
    right and bottom only, as in the DDPM TensorFlow code (diffusers' ``downsample_padding=0``)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"net.downsample_padding={padding!r}; allowed: 1 (every side) or 0 (right and bottom, DDPM)")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to context tokens (keys/values), masked.

    ``mask``: (N, L) bool, True = a real token. Padding tokens get no attention weight.
    """

    def __init__(self, query_dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"cross-attention: channels={query_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * query_dim, bias=False)
        self.proj = nn.Linear(query_dim, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, lq, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.to_q(x).reshape(n, lq, h, d).transpose(1, 2)
        k, v = self.to_kv(context).reshape(n, context.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
        attn_mask = mask[:, None, None, :].bool() if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(n, lq, c))


class TransformerBlock(nn.Module):
    """Text-conditioned block (Rombach et al. 2022): x + SelfAttn, x + CrossAttn(text), x + FeedForward (GEGLU-free MLP).

    Operates on the (N, H*W, C) token view of a feature map, with a residual around the whole block.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1, ff_mult: int = 4):
        super().__init__()
        self.norm_in = group_norm(channels)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(channels), nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.cross_attn = CrossAttention(channels, context_dim, num_heads)
        self.ff = nn.Sequential(nn.Linear(channels, ff_mult * channels), nn.GELU(), nn.Linear(ff_mult * channels, channels))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm_in(x).flatten(2).transpose(1, 2)
        y = self.norm1(tokens)
        tokens = tokens + self.self_attn(y, y, y, need_weights=False)[0]
        tokens = tokens + self.cross_attn(self.norm2(tokens), context, mask)
        tokens = tokens + self.ff(self.norm3(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(n, c, h, w)


def check_context(kind: str, context_dim: int | None, context: torch.Tensor | None) -> None:
    """The denoiser contract's text input: ``context`` (N, L, context_dim) exactly when the net has
    cross-attention (``context_dim``); ``kind`` ("U-Net", "DiT") names the net in the error."""
    if context is not None and not context_dim:
        raise ValueError(f"this {kind} has no cross-attention; build it with net.context_dim to pass context")
    if context_dim and context is None:
        raise ValueError(f"this {kind} conditions on text: pass context (N, L, context_dim) tokens")
    if context is not None and context.shape[-1] != context_dim:
        raise ValueError(f"context width {context.shape[-1]} != net.context_dim={context_dim}")
