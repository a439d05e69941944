"""Latent diffusion (Rombach et al. 2022) as a LightningModule: pixel diffusion's training and sampling,
run on the latents of a frozen autoencoder."""
from __future__ import annotations

import math
import warnings

import torch

from diffexp.autoencoders import FrozenAutoencoder
from diffexp.lit.pixel import PixelDiffusion


class LatentDiffusion(PixelDiffusion):
    """Denoises z = (E(x) - shift) * scale; samples are decoded, x = D(z / scale + shift).

    Everything else (schedules, samplers, U-Net, text conditioning, guidance, EMA, callbacks) is
    :class:`PixelDiffusion`'s. The net works at the latent size with the autoencoder's channels.

    Args:
        autoencoder: a :class:`diffexp.autoencoders.FrozenAutoencoder` (``vae`` config group).
        image_size: the data's resolution (checked against the net and the downsampling factor).
        scale_factor: fixed latent scale. ``None``: the autoencoder's published one, or else
            1 / std of the latents of the first ``scale_estimate_images`` training images,
            estimated once when training starts (LDM's rescaling, Sec. 4.3.2 / App. D.1) and
            stored in the checkpoint (buffer ``latent_scale``), so resuming never recomputes it.
        cache_latents: encode the training and validation sets once before training (cached on disk
            under ``$DIFFEXP_CACHE/latents``) instead of encoding every batch.
        **kwargs: :class:`PixelDiffusion`'s arguments.
    """

    def __init__(self, net, autoencoder: FrozenAutoencoder, image_size: int, scale_factor: float | None = None,
                 scale_estimate_images: int = 1024, cache_latents: bool = False, **kwargs):
        latent_size = autoencoder.check_image_size(image_size)
        if net.in_channels != autoencoder.latent_channels:
            raise ValueError(f"unet.in_channels={net.in_channels} but the VAE ({autoencoder.name}) makes latents with "
                             f"{autoencoder.latent_channels} channels; set unet.in_channels={autoencoder.latent_channels} "
                             f"(or null to follow the VAE)")
        if net.image_size != latent_size:
            raise ValueError(f"unet.image_size={net.image_size} but the latents of {image_size}px images are "
                             f"{latent_size}px (f={autoencoder.downsampling_factor}); set unet.image_size={latent_size} "
                             f"(or null to follow the VAE)")
        if scale_factor is not None and not scale_factor > 0:
            raise ValueError(f"model.scale_factor must be positive or null, got {scale_factor}")
        if scale_estimate_images <= 0:
            raise ValueError(f"model.scale_estimate_images must be positive, got {scale_estimate_images}")
        super().__init__(net, **kwargs)
        self.autoencoder = autoencoder
        self.image_size, self.scale_estimate_images, self.cache_latents = image_size, scale_estimate_images, cache_latents
        scale = scale_factor if scale_factor is not None else autoencoder.scaling_factor
        self.register_buffer("latent_scale", torch.tensor(math.nan if scale is None else float(scale)))
        self.register_buffer("latent_shift", torch.tensor(float(autoencoder.shift_factor)))

    # --- latent space -----------------------------------------------------------------------------
    def _scale(self) -> torch.Tensor:
        if torch.isnan(self.latent_scale):
            raise RuntimeError("the latent scale factor is not set yet: it is estimated when training starts "
                               "(or set model.scale_factor)")
        return self.latent_scale

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images, self._scale(), self.latent_shift)

    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z, self._scale(), self.latent_shift)

    def diffusion_input(self, batch: dict) -> torch.Tensor:
        # training only: on_fit_start has set the scale, so no NaN check (a host sync) per step
        if "latent" in batch:  # pre-encoded (raw) latents
            return self.autoencoder.to_diffusion(batch["latent"], self.latent_scale, self.latent_shift)
        return self.autoencoder.encode(batch["image"], self.latent_scale, self.latent_shift)

    @torch.no_grad()
    def estimate_scale(self, dataset) -> float:
        """1 / std of the raw latents (minus shift) of the first ``scale_estimate_images`` items of ``dataset``."""
        n = min(self.scale_estimate_images, len(dataset))
        items = [dataset[i] for i in range(n)]
        if "latent" in items[0]:
            raw = torch.stack([item["latent"] for item in items]).to(self.device)
        else:
            raw = self.autoencoder.encode(torch.stack([item["image"] for item in items]).to(self.device), 1.0)
        return float(1.0 / (raw - self.latent_shift).flatten().std())

    def make_sampler(self, sampler=None):
        """As :meth:`PixelDiffusion.make_sampler`, with ``clip_sample`` off: it clamps predicted x0 to the pixel
        range [-1, 1], which would cut off latents (unit variance, unbounded)."""
        sampler = super().make_sampler(sampler)
        if sampler.clip_sample:
            warnings.warn("sampler.clip_sample=true clamps x0 to [-1, 1]; latents are unbounded, so latent models "
                          "sample with clip_sample=false", stacklevel=2)
            sampler.clip_sample = False
        return sampler

    # --- hooks --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not self.cache_latents or datamodule is None or stage != "fit":
            return
        from diffexp.data.latents import LatentDataset, encode_dataset

        device = self.trainer.strategy.root_device
        self.autoencoder.to(device)
        for split in ("train_set", "val_set"):
            dataset = getattr(datamodule, split)
            if dataset is not None and not isinstance(dataset, LatentDataset):
                setattr(datamodule, split, LatentDataset(dataset, encode_dataset(dataset, self.autoencoder, device)))

    def on_fit_start(self) -> None:
        """Estimate the latent scale once: a value restored from a checkpoint is kept."""
        if torch.isnan(self.latent_scale):  # the datamodule is set up by now (Lightning runs its setup first)
            self.latent_scale.fill_(self.estimate_scale(self.trainer.datamodule.train_set))
            self.print(f"[diffexp] latent scale factor 1/std = {self.latent_scale.item():.5f} "
                       f"(from {min(self.scale_estimate_images, len(self.trainer.datamodule.train_set))} images)")
