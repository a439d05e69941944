"""The diffusion transformer (DiT, Peebles & Xie 2023) with adaLN-Zero blocks; text by cross-attention
(PixArt-alpha, Chen et al. 2023).

An image (N, C, H, W) is cut into p x p patches, each a token: a strided convolution maps it to the width D and a
fixed 2-D sin-cos position embedding is added. A conditioning vector c = MLP(sinusoid(noise input)) + class
embedding (+ a projection of the pooled text embedding) drives every block by adaptive LayerNorm: the block's
modulation layer maps SiLU(c) to (shift, scale, gate) for attention and for the MLP,

    x = x + gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)
    x = x + CrossAttn(LN(x), text)                                  (text models only)
    x = x + gate_m * MLP(LN(x) * (1 + scale_m) + shift_m)

with the modulation layers, the final layer and the cross-attention output initialised to zero (adaLN-Zero), so
every block starts as the identity and the net's output starts at zero. The last layer modulates a LayerNorm
the same way (shift, scale) and maps each token back to a p x p x C patch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffexp.nets.layers import CrossAttention, check_context, timestep_embedding
from diffexp.registry import register_part

#: The DiT paper's Table 1: depth (blocks), width D, attention heads.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (1, 2, 4, 8)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim / 2)), i < dim / 2 (Vaswani et al. 2017), as float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """The fixed position embedding of a grid_size x grid_size grid of patches (DiT, MAE), (grid_size^2, dim) for
    the row-major token order: the first dim/2 channels encode the column, the last dim/2 the row."""
    if dim % 4:
        raise ValueError(f"net.hidden_size={dim} must be divisible by 4 (2-D sin-cos position embedding)")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm's affine part, per sample: x (N, L, D) * (1 + scale) + shift, scale and shift (N, D)
    (one fused multiply-add: no (N, L, D) intermediate)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (N, L, D): fused ``qkv`` projection, scaled dot-product, ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"net.hidden_size={dim} must be divisible by net.num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v), each (N, heads, L, D / heads). A plain ``qkv`` runs as three products with its weight's row
        blocks (three (N, L, D) outputs, not one (N, L, 3D) output cut apart, whose gradient is restacked); a
        wrapped one (a LoRA adapter) runs as its module."""
        n, length, dim = x.shape
        if type(self.qkv) is nn.Linear:
            parts = [F.linear(x, w, b) for w, b in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3))]
        else:
            parts = self.qkv(x).chunk(3, dim=-1)
        return tuple(part.reshape(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2) for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        out = F.scaled_dot_product_attention(*self.heads(x))
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(D / heads)): (N, heads, L queries, L keys), the weights ``forward`` averages v by."""
        q, k, _ = self.heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (see the module docstring); ``context_dim`` adds cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.cross_attn = CrossAttention(dim, context_dim, num_heads) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = torch.addcmul(x, gate_a[:, None], self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), shift_m, scale_m)), approximate="tanh"))
        return torch.addcmul(x, gate_m[:, None], h)  # x + gate_m * h, fused


@register_part
class DiT(nn.Module):
    """Diffusion transformer: model(x_t, t, class_labels=None, context=None, context_mask=None, pooled=None) ->
    Tensor like x_t, the same call as :class:`~diffexp.nets.UNet`.

    Args:
        image_size, in_channels, out_channels: the input (square) and output channels (default: in).
        patch_size: p, one token per p x p patch (2, 4 or 8 in the paper; 1 allowed); image_size must divide by p.
        depth, hidden_size, num_heads: the paper's sizes are :data:`DIT_SIZES` (S, B, L, XL).
        mlp_ratio: the MLP's hidden width over D (4).
        num_classes: a class embedding added to c; index ``num_classes`` is the null class (classifier-free guidance).
        context_dim: cross-attention to text tokens of this width in every block, and a pooled text vector
            (``pooled``) projected and added to c.
        time_freq_shift: the sinusoid's frequency shift (:func:`~diffexp.nets.layers.timestep_embedding`); the paper
            uses 0, diffusers' ``DiTTransformer2DModel`` 1 (set by ``net.init_from``).
        mlp_norm_eps: the epsilon of the LayerNorm before the MLP (the paper 1e-6, diffusers' default 1e-5).
        frequency_dim: the width of the sinusoidal noise embedding (256).
        gradient_checkpointing: recompute each block in the backward pass instead of storing its activations.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        depth: int = 12,
        hidden_size: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        time_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
        frequency_dim: int = 256,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"net.patch_size={patch_size!r}; allowed: {list(PATCH_SIZES)}")
        if image_size % patch_size:
            raise ValueError(f"net.image_size={image_size} must be divisible by net.patch_size={patch_size} "
                             f"(change data.image_size or net.patch_size)")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"net.depth must be a positive integer, got {depth!r}")
        self.image_size, self.in_channels = image_size, in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size, self.depth, self.hidden_size, self.num_heads = patch_size, depth, hidden_size, num_heads
        self.num_classes, self.context_dim = num_classes, context_dim
        self.time_freq_shift, self.frequency_dim = float(time_freq_shift), frequency_dim
        self.gradient_checkpointing = bool(gradient_checkpointing)
        timestep_embedding(torch.zeros(1), frequency_dim, freq_shift=time_freq_shift)  # checks the shift

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, image_size // patch_size)[None], persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.pooled_proj = nn.Linear(context_dim, hidden_size) if context_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim, mlp_norm_eps)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: Xavier-uniform linear layers (the patch embedding as one), N(0, 0.02) time
        MLP and class table, zero biases; zero modulation, final layer and cross-attention output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        zeroed = [self.final_modulation, self.final_linear]
        for block in self.blocks:
            zeroed.append(block.modulation)
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, D) tokens, row-major, position embedding added."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.pos_embed.to(tokens.dtype)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W): token (i, j)'s vector holds its patch as (p, p, C)."""
        p, c = self.patch_size, self.out_channels
        n = tokens.shape[0]
        x = tokens.reshape(n, height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, height, width)

    def conditioning(self, t: torch.Tensor, class_labels=None, pooled=None, dtype=None) -> torch.Tensor:
        """c = MLP(sinusoid(t)) + class embedding (the null class when no label is given) + proj(pooled)."""
        freqs = timestep_embedding(t, self.frequency_dim, freq_shift=self.time_freq_shift)
        c = self.time_embed(freqs.to(dtype or self.time_embed[0].weight.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            c = c + self.class_embed(class_labels)
        if pooled is not None and self.pooled_proj is not None:
            c = c + self.pooled_proj(pooled)
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        height, width = x.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"this DiT takes {self.image_size}x{self.image_size} inputs (its position embedding), "
                             f"got {height}x{width}")
        check_context("DiT", self.context_dim, context)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.patchify(x)
        c = self.conditioning(t, class_labels, pooled, dtype=tokens.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=1)
        tokens = self.final_linear(modulate(self.final_norm(tokens), shift, scale))
        return self.unpatchify(tokens, height, width)


def dit_gflops(net: DiT, context_length: int = 0) -> float:
    """Giga multiply-adds of one forward pass per sample, the DiT paper's "Gflops" (fvcore's count): the
    per-token linear layers (patch embedding, attention projections, MLP, final layer), attention's two matrix
    products (2 L^2 D per block), the per-sample conditioning layers and, for text models, cross-attention to
    ``context_length`` tokens; norms and activations are left out. DiT-XL/2 at 256 px (32x32x4 latents): 118.6."""
    tokens, dim, depth = net.num_tokens, net.hidden_size, net.depth
    per_token = net.patch_embed.weight.numel() + net.final_linear.weight.numel()
    per_sample = sum(m.weight.numel() for m in (net.time_embed[0], net.time_embed[2], net.final_modulation))
    per_sample += net.pooled_proj.weight.numel() if net.pooled_proj is not None else 0
    attention = 0
    for block in net.blocks:
        per_token += sum(m.weight.numel() for m in (block.attn.qkv, block.attn.proj, block.fc1, block.fc2))
        per_sample += block.modulation.weight.numel()
        attention += 2 * tokens * tokens * dim
        if block.cross_attn is not None:
            per_token += block.cross_attn.to_q.weight.numel() + block.cross_attn.proj.weight.numel()
            attention += 2 * tokens * context_length * dim + context_length * block.cross_attn.to_kv.weight.numel()
    return (tokens * per_token + per_sample + attention) / 1e9


def paper_dit(size: str, patch_size: int = 2, image_size: int = 32, in_channels: int = 4,
              num_classes: int | None = 1000) -> DiT:
    """A DiT of the paper's size ``S``, ``B``, ``L`` or ``XL`` (:data:`DIT_SIZES`); build it under
    ``torch.device("meta")`` to count without memory."""
    if size not in DIT_SIZES:
        raise ValueError(f"DiT size {size!r}; allowed: {list(DIT_SIZES)}")
    depth, width, heads = DIT_SIZES[size]
    return DiT(image_size, in_channels, patch_size=patch_size, depth=depth, hidden_size=width, num_heads=heads,
               num_classes=num_classes)


def dit_parameters(size: str, patch_size: int = 2, image_size: int = 32, in_channels: int = 4,
                   num_classes: int | None = 1000) -> int:
    """Parameter count of a paper size (``S``, ``B``, ``L``, ``XL``) built on the meta device (no memory)."""
    with torch.device("meta"):
        net = paper_dit(size, patch_size, image_size, in_channels, num_classes)
    return sum(p.numel() for p in net.parameters())
