"""The diffusion U-Net (Ho et al. 2020; Dhariwal & Nichol 2021 improvements optional)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffexp.nets.layers import (AttentionBlock, Downsample, ResBlock, TransformerBlock, Upsample, check_context,
                                 group_norm, timestep_embedding)
from diffexp.registry import register_part


@register_part
class UNet(nn.Module):
    """eps/x0/v-prediction U-Net: model(x_t, t, class_labels=None, context=None) -> Tensor like x_t.

    Args:
        image_size: input height = width; must be divisible by 2 ** (len(channel_mult) - 1).
        in_channels, out_channels: image channels (out defaults to in).
        base_channels: channels at full resolution; level i has base_channels * channel_mult[i].
        channel_mult: one entry per resolution level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: resolutions (e.g. 16 for 16x16) that get self-attention.
        attention_levels: alternatively, level indices into ``channel_mult`` that get
            self-attention (-1 = the lowest resolution), independent of image size.
        num_heads: attention heads.
        dropout: dropout inside residual blocks.
        scale_shift: time injection as GroupNorm scale-shift (True) or addition (False, DDPM).
        num_classes: if set, a class-label embedding is added to the time embedding; index
            ``num_classes`` is the "no label" class used for classifier-free guidance.
        context_dim: if set, the attention layers become transformer blocks with cross-attention
            to text tokens of this width (forward's ``context``/``context_mask``), and a pooled
            text vector (``pooled``) may be added to the time embedding.
        time_embedding_order, time_freq_shift: the sinusoidal time embedding's layout
            (:func:`~diffexp.nets.layers.timestep_embedding`): ``cos_sin``/0 is diffexp's, ``sin_cos``/1 DDPM's.
        downsample_padding: 1 pads every side of the stride-2 convolution, 0 the right and bottom only (DDPM).
        The three change no weight shape: they let weights trained elsewhere (diffusers' ``UNet2DModel``, see
        :mod:`diffexp.interop`) give the same function here.
        gradient_checkpointing: recompute each residual and attention block in the backward pass instead of
            storing its activations (less memory, one more forward of the blocks).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        attention_levels: Sequence[int] | None = None,
        num_heads: int = 1,
        dropout: float = 0.1,
        scale_shift: bool = True,
        num_classes: int | None = None,
        context_dim: int | None = None,
        time_embedding_order: str = "cos_sin",
        time_freq_shift: float = 0.0,
        downsample_padding: int = 1,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(not isinstance(m, int) or m <= 0 for m in channel_mult):
            raise ValueError(f"net.channel_mult={list(channel_mult)} must list one positive integer per resolution "
                             f"level, e.g. [1, 2, 2]")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} cannot pass through a U-Net with channel_mult={list(channel_mult)}: "
                f"it must be divisible by 2**{len(channel_mult) - 1} = {factor} "
                f"(change data.image_size or net.channel_mult)"
            )
        if not isinstance(base_channels, int) or isinstance(base_channels, bool) or base_channels <= 0:
            raise ValueError(f"net.base_channels must be a positive integer, got {base_channels!r}")
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        bad = [r for r in attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(
                f"net.attention_resolutions={list(attention_resolutions)} includes {bad}, which the U-Net never "
                f"reaches at image_size={image_size}; allowed: {resolutions}"
            )
        levels = list(attention_levels or [])
        bad = [lv for lv in levels if not -len(resolutions) <= lv < len(resolutions)]
        if bad:
            raise ValueError(f"net.attention_levels={levels} includes {bad}; allowed: "
                             f"{-len(resolutions)}..{len(resolutions) - 1} (one per channel_mult entry)")
        attention_resolutions = set(attention_resolutions) | {resolutions[lv] for lv in levels}
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.min_divisor = factor
        self.channel_mult, self.num_res_blocks, self.num_heads = channel_mult, num_res_blocks, num_heads
        self.scale_shift = scale_shift
        self.attention_resolutions = sorted(attention_resolutions, reverse=True)
        self.time_embedding_order, self.time_freq_shift = time_embedding_order, float(time_freq_shift)
        self.downsample_padding = downsample_padding
        self.gradient_checkpointing = bool(gradient_checkpointing)
        timestep_embedding(torch.zeros(1), base_channels, order=time_embedding_order, freq_shift=time_freq_shift)
        temb_dim = base_channels * 4

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.pooled_proj = nn.Linear(context_dim, temb_dim) if context_dim else None

        def attention(channels):
            if context_dim:
                return TransformerBlock(channels, context_dim, num_heads)
            return AttentionBlock(channels, num_heads)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin, cout):
            return ResBlock(cin, cout, temb_dim, dropout, scale_shift)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [block(ch, base_channels * mult)]
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch, downsample_padding)]))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([block(ch, ch), attention(ch), block(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers = [block(ch + skip_channels.pop(), base_channels * mult)]
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    layers.append(attention(ch))
                self.up.append(nn.ModuleList(layers))
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor, context=None, mask=None) -> torch.Tensor:
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in layers:
            if isinstance(layer, ResBlock):
                args = (h, temb)
            elif isinstance(layer, TransformerBlock):
                args = (h, context, mask)
            else:
                args = (h,)
            resampling = isinstance(layer, (Downsample, Upsample))
            h = checkpoint(layer, *args, use_reentrant=False) if recompute and not resampling else layer(*args)
        return h

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.shape[-1] % self.min_divisor or x.shape[-2] % self.min_divisor:
            raise ValueError(f"input of size {tuple(x.shape[-2:])} must be divisible by {self.min_divisor}")
        check_context("U-Net", self.context_dim, context)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.base_channels, order=self.time_embedding_order,
                                                 freq_shift=self.time_freq_shift))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(class_labels)
        if pooled is not None and self.pooled_proj is not None:
            temb = temb + self.pooled_proj(pooled)
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, temb, context, context_mask)
            skips.append(h)
        h = self._run(self.mid, h, temb, context, context_mask)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, temb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
