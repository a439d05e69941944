"""A KL-regularised convolutional autoencoder in the Latent Diffusion style (Rombach et al. 2022, Sec. 3.1).

x (N, C, H, W) in [-1, 1] -> posterior q(z|x) = N(mean, diag(exp(logvar))) over z (N, z_ch, H/f, W/f)
-> decoder -> x_hat. f = 2 ** (len(channel_mult) - 1). Pure torch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from diffexp.nets.layers import AttentionBlock, Downsample, ResBlock, Upsample, group_norm
from diffexp.registry import register_part


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * e, e ~ N(0, I) (the reparameterisation trick)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example, summed over latent elements:
        0.5 * sum(mean^2 + var - 1 - logvar)  (>= 0, zero iff mean = 0 and var = 1)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


def _check_channels(name: str, channels: int) -> None:
    if channels % min(32, channels):
        raise ValueError(f"{name}={channels} must be a multiple of 32 or below 32 (GroupNorm groups)")


class Encoder(nn.Module):
    """conv -> [ResBlocks, Downsample] per level -> ResBlock, Attention, ResBlock -> norm, SiLU, conv to 2*z_ch."""

    def __init__(self, in_channels: int, base_channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_channels: int, attention: bool):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width, None))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(ch, ch, None), AttentionBlock(ch) if attention else nn.Identity(),
                                 ResBlock(ch, ch, None))
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """The encoder mirrored: conv -> mid -> [ResBlocks, Upsample] per level -> norm, SiLU, conv to image."""

    def __init__(self, out_channels: int, base_channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_channels: int, attention: bool):
        super().__init__()
        widths = [base_channels * m for m in channel_mult][::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch, ch, None), AttentionBlock(ch) if attention else nn.Identity(),
                                 ResBlock(ch, ch, None))
        blocks: list[nn.Module] = []
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, width, None))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


@register_part
class AutoencoderKL(nn.Module):
    """The LDM first-stage model: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x_hat``.

    Args:
        in_channels: image channels (1 or 3).
        image_size: training resolution (only checked: it must be divisible by f).
        base_channels, channel_mult: widths per level; f = 2 ** (len(channel_mult) - 1).
        num_res_blocks: residual blocks per level (the decoder has one more, as in LDM).
        latent_channels: channels of z.
        attention: self-attention in the middle (lowest resolution) blocks.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, base_channels: int = 64,
                 channel_mult: list[int] | tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 latent_channels: int = 4, attention: bool = True):
        super().__init__()
        channel_mult = list(channel_mult)
        if not channel_mult:
            raise ValueError("vae channel_mult must name at least one level")
        for m in channel_mult:
            _check_channels("vae base_channels * channel_mult", base_channels * m)
        if latent_channels <= 0 or num_res_blocks <= 0:
            raise ValueError(f"vae latent_channels and num_res_blocks must be positive, got {latent_channels}, "
                             f"{num_res_blocks}")
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        if image_size % self.downsampling_factor:
            raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor "
                             f"f={self.downsampling_factor} (channel_mult={channel_mult})")
        self.in_channels, self.image_size, self.latent_channels = in_channels, image_size, latent_channels
        self.config = {"in_channels": in_channels, "image_size": image_size, "base_channels": base_channels,
                       "channel_mult": channel_mult, "num_res_blocks": num_res_blocks,
                       "latent_channels": latent_channels, "attention": attention}  # the constructor arguments
        self.encoder = Encoder(in_channels, base_channels, channel_mult, num_res_blocks, latent_channels, attention)
        self.decoder = Decoder(in_channels, base_channels, channel_mult, num_res_blocks, latent_channels, attention)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsampling_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(x_hat, posterior): decode a posterior sample (training) or its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


__all__ = ["AutoencoderKL", "DiagonalGaussian", "Encoder", "Decoder"]
