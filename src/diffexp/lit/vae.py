"""Training the latent-diffusion autoencoder (``python train.py model=vae``)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from diffexp.lit.base import TrainingModule
from diffexp.nets.autoencoder import AutoencoderKL
from diffexp.registry import register_part

RECONSTRUCTION_LOSSES = ("l1", "l2")


@register_part
class VAETraining(TrainingModule):
    """Trains an :class:`~diffexp.nets.AutoencoderKL` with the LDM objective (Rombach et al. 2022, App. G):

        loss = sum_pixels rec(x, x_hat) + lpips_weight * LPIPS(x, x_hat) * H * W + kl_weight * KL(q(z|x) || N(0, I))

    per image (sums over pixels and latent elements, as LDM's ``LPIPSWithDiscriminator`` without the
    discriminator and learned log-variance), averaged over the batch; x_hat decodes a posterior sample.

    Args:
        net: the autoencoder.
        kl_weight: weight of the KL term (LDM: 1e-6, which keeps latents near-deterministic).
        reconstruction_loss: ``l1`` | ``l2``.
        lpips_weight: > 0 adds the LPIPS perceptual loss (needs torchvision's backbone weights).
        optimizer, lr_scheduler: partials (default Adam, lr 1e-3; :class:`diffexp.lit.base.TrainingModule`).
    """

    def __init__(self, net: AutoencoderKL, kl_weight: float = 1e-6, reconstruction_loss: str = "l1",
                 lpips_weight: float = 0.0, lpips_net: str = "alex", optimizer: Callable | None = None,
                 lr_scheduler: Callable | None = None):
        super().__init__(optimizer or partial(torch.optim.Adam, lr=1e-3), lr_scheduler)
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"model.reconstruction_loss={reconstruction_loss!r}; allowed: {list(RECONSTRUCTION_LOSSES)}")
        if kl_weight < 0 or lpips_weight < 0:
            raise ValueError(f"model.kl_weight and model.lpips_weight must be >= 0, got {kl_weight}, {lpips_weight}")
        self.net, self.kl_weight, self.reconstruction_loss = net, kl_weight, reconstruction_loss
        self.lpips_weight = lpips_weight
        self._lpips = []  # kept out of the module tree: frozen, not checkpointed
        if lpips_weight > 0:
            from diffexp.metrics.scores import lpips_model

            self._lpips.append(lpips_model(lpips_net).requires_grad_(False))

    def losses(self, x: torch.Tensor, sample_posterior: bool = True) -> dict[str, torch.Tensor]:
        """{loss, rec, kl, lpips, x_hat} for a batch of images in [-1, 1]."""
        x_hat, posterior = self.net(x, sample_posterior=sample_posterior)
        diff = (x_hat - x).abs() if self.reconstruction_loss == "l1" else (x_hat - x).pow(2)
        rec = diff.flatten(1).sum(1).mean()
        kl = posterior.kl().mean()
        out = {"rec": rec, "kl": kl, "loss": rec + self.kl_weight * kl, "x_hat": x_hat}
        if self._lpips:
            lp = self._lpips[0].to(x.device)
            rgb = (lambda t: t.repeat(1, 3, 1, 1)) if x.shape[1] == 1 else (lambda t: t)
            perceptual = lp(rgb(x_hat), rgb(x)).mean() * x.shape[-1] * x.shape[-2]
            out["lpips"], out["loss"] = perceptual, out["loss"] + self.lpips_weight * perceptual
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch["image"])
        n = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        self.log("train/rec_loss", out["rec"], batch_size=n)
        self.log("train/kl", out["kl"], batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        out = self.losses(x, sample_posterior=False)
        psnr = peak_signal_noise_ratio(out["x_hat"].clamp(-1, 1), x, data_range=2.0, reduction="none", dim=(1, 2, 3))
        n = x.shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/rec_loss", out["rec"], sync_dist=True, batch_size=n)
        self.log("val/kl", out["kl"], sync_dist=True, batch_size=n)
        self.log("val/psnr", psnr.mean(), prog_bar=True, sync_dist=True, batch_size=n)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of x, clamped to [-1, 1]."""
        return self.net(x, sample_posterior=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: dict | None, **unused) -> dict[str, torch.Tensor]:
        """``reconstructions``: the batch's images over their reconstructions, (2, N, C, H, W) in [-1, 1].
        Options meant for diffusion models (samples, timesteps, ...) are ignored."""
        if batch is None:
            return {}
        was_training = self.training
        self.eval()
        try:
            x = batch["image"].to(self.device)
            return {"reconstructions": torch.stack([x, self.reconstruct(x)])}
        finally:
            self.train(was_training)
