"""Spaces: where diffusion runs. Pixels (the identity) or the latents of a frozen autoencoder.

A space maps images in [-1, 1] to the x_0 the net denoises and back, tells how the net must be built
(channels, size), and fits itself to the data before training (the latent scale). The one scale/shift
convention of latent diffusion (Rombach et al. 2022) lives in :class:`LatentSpace`:

    z = (E(x) - shift) * scale          x = D(z / scale + shift)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffexp.autoencoders import FrozenAutoencoder
from diffexp.registry import register_part


@register_part
class PixelSpace(nn.Module):
    """Diffusion on the images themselves (``model=pixel``)."""

    #: whether samplers may clamp predicted x0 to [-1, 1] (the image range)
    bounded = True


    def net_arguments(self, image_size: int, channels: int) -> dict:
        """What the denoiser works on: the images' channels and size."""
        return {"in_channels": channels, "image_size": image_size}

    def check_net(self, net: nn.Module) -> None:
        """Raise a clear error if ``net`` does not work on this space's tensors."""

    def fit(self, datamodule) -> str | None:
        """Adapt to the data before training (nothing for pixels); returns a message for the log, if any."""
        return None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> x_0 in this space."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x_0 in this space -> images (not clamped)."""
        return x

    def from_batch(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 of a training batch (``generator``: for spaces that draw, see :meth:`LatentSpace.from_batch`)."""
        return self.encode(batch["image"])

    def cached(self, datamodule):
        """``datamodule`` with its items pre-encoded into this space once (``cache_latents=true``)."""
        raise ValueError("cache_latents=true pre-encodes the data with a latent model's autoencoder; this model "
                         "diffuses pixels (use model=latent, or cache_latents=false)")


@register_part
class LatentSpace(PixelSpace):
    """Diffusion on z = (E(x) - shift) * scale of a frozen autoencoder (``model=latent``).

    Args:
        autoencoder: a :class:`diffexp.autoencoders.FrozenAutoencoder` (``vae`` config group).
        image_size: the data's resolution (checked against the downsampling factor).
        scale_factor: fixed latent scale. ``None``: the autoencoder's published one, or else 1 / std of the
            latents of the first ``scale_estimate_images`` training images, estimated once when training
            starts (LDM's rescaling, Sec. 4.3.2 / App. D.1) and kept in the checkpoint (buffer
            ``latent_scale``), so resuming never recomputes it.
    Batches may carry pre-encoded raw latents under ``"latent"`` (``cache_latents=true``).
    """

    bounded = False  # latents are unbounded: clamping x0 to [-1, 1] would cut them off

    def __init__(self, autoencoder: FrozenAutoencoder | None = None, image_size: int = 32,
                 scale_factor: float | None = None, scale_estimate_images: int = 1024):
        super().__init__()
        if not isinstance(autoencoder, FrozenAutoencoder):
            raise ValueError("model=latent needs an autoencoder: vae=own vae.ckpt=PATH | vae=sd_vae_ft_mse | vae=taesd")
        if scale_factor is not None and not scale_factor > 0:
            raise ValueError(f"model.space.scale_factor must be positive or null, got {scale_factor}")
        if scale_estimate_images <= 0:
            raise ValueError(f"model.space.scale_estimate_images must be positive, got {scale_estimate_images}")
        self.autoencoder = autoencoder
        self.image_size, self.latent_size = image_size, autoencoder.check_image_size(image_size)
        self.scale_estimate_images = scale_estimate_images
        scale = scale_factor if scale_factor is not None else autoencoder.scaling_factor
        self.register_buffer("latent_scale", torch.tensor(math.nan if scale is None else float(scale)))
        self.register_buffer("latent_shift", torch.tensor(float(autoencoder.shift_factor)))

    def net_arguments(self, image_size: int, channels: int) -> dict:
        return {"in_channels": self.autoencoder.latent_channels, "image_size": self.latent_size}

    def check_net(self, net) -> None:
        if net.in_channels != self.autoencoder.latent_channels:
            raise ValueError(f"net.in_channels={net.in_channels} but the VAE ({self.autoencoder.name}) makes latents "
                             f"with {self.autoencoder.latent_channels} channels; set net.in_channels="
                             f"{self.autoencoder.latent_channels} (or null to follow the VAE)")
        if net.image_size != self.latent_size:
            raise ValueError(f"net.image_size={net.image_size} but the latents of {self.image_size}px images are "
                             f"{self.latent_size}px (f={self.autoencoder.downsampling_factor}); set net.image_size="
                             f"{self.latent_size} (or null to follow the VAE)")

    def scale(self) -> torch.Tensor:
        if torch.isnan(self.latent_scale):
            raise RuntimeError("the latent scale factor is not set yet: it is estimated when training starts "
                               "(or set model.space.scale_factor)")
        return self.latent_scale

    def encode(self, images):
        return self.autoencoder.encode(images, self.scale(), self.latent_shift)

    def decode(self, z):
        return self.autoencoder.decode(z, self.scale(), self.latent_shift)

    def cached(self, datamodule):
        from diffexp.data.latents import CachedLatentsDataModule

        return CachedLatentsDataModule(datamodule, self.autoencoder)

    def from_batch(self, batch, generator: torch.Generator | None = None):
        """The diffusion latents of a training batch: encoded from ``image``, or pre-encoded raw latents
        (``latent``; with ``latent_logvar`` the posterior mean and log-variance, from which latent = mean +
        exp(logvar / 2) * eps is drawn with ``generator``)."""
        # training only: fit() has set the scale, so no NaN check (a host sync) per step
        if "latent" in batch:  # pre-encoded raw latents
            raw = batch["latent"]
            if "latent_logvar" in batch:
                eps = torch.randn(raw.shape, generator=generator, device=raw.device, dtype=raw.dtype)
                raw = raw + torch.exp(0.5 * batch["latent_logvar"]) * eps
            return self.autoencoder.to_diffusion(raw, self.latent_scale, self.latent_shift)
        return self.autoencoder.encode(batch["image"], self.latent_scale, self.latent_shift)

    @torch.no_grad()
    def estimate_scale(self, dataset) -> float:
        """1 / std of the raw latents (minus shift) of the first ``scale_estimate_images`` items of ``dataset``."""
        n = min(self.scale_estimate_images, len(dataset))
        items = [dataset[i] for i in range(n)]
        device = self.latent_shift.device
        if "latent" in items[0]:
            raw = torch.stack([item["latent"] for item in items]).to(device)
        else:
            raw = self.autoencoder.encode(torch.stack([item["image"] for item in items]).to(device), 1.0)
        return float(1.0 / (raw - self.latent_shift).flatten().std())

    def fit(self, datamodule) -> str | None:
        """Estimate the latent scale once: a value set in the config or restored from a checkpoint is kept."""
        if not torch.isnan(self.latent_scale):
            return None
        dataset = datamodule.dataset("train")
        self.latent_scale.fill_(self.estimate_scale(dataset))
        return (f"latent scale factor 1/std = {self.latent_scale.item():.5f} "
                f"(from {min(self.scale_estimate_images, len(dataset))} images)")
