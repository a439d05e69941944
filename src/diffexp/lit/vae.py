"""Training the latent-diffusion autoencoder (``python train.py model=vae``) and loading it back."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from diffexp.lit.checkpoint import CONFIG_KEY, read_checkpoint
from diffexp.nets.autoencoder import AutoencoderKL

RECONSTRUCTION_LOSSES = ("l1", "l2")


class VAETraining(L.LightningModule):
    """Trains an :class:`~diffexp.nets.AutoencoderKL` with the LDM objective (Rombach et al. 2022, App. G):

        loss = sum_pixels rec(x, x_hat) + lpips_weight * LPIPS(x, x_hat) * H * W + kl_weight * KL(q(z|x) || N(0, I))

    per image (sums over pixels and latent elements, as LDM's ``LPIPSWithDiscriminator`` without the
    discriminator and learned log-variance), averaged over the batch; x_hat decodes a posterior sample.

    Args:
        net: the autoencoder.
        kl_weight: weight of the KL term (LDM: 1e-6, which keeps latents near-deterministic).
        reconstruction_loss: ``l1`` | ``l2``.
        lpips_weight: > 0 adds the LPIPS perceptual loss (needs torchvision's backbone weights).
        optimizer: a partial optimizer (default Adam, lr 1e-3); warmup_steps: linear warm-up.
        num_logged_images: reconstructions logged (first validation batch) as a grid of inputs over outputs.
    """

    def __init__(self, net: AutoencoderKL, kl_weight: float = 1e-6, reconstruction_loss: str = "l1",
                 lpips_weight: float = 0.0, lpips_net: str = "alex", optimizer: Callable | None = None,
                 warmup_steps: int = 0, num_logged_images: int = 8):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"model.reconstruction_loss={reconstruction_loss!r}; allowed: {list(RECONSTRUCTION_LOSSES)}")
        if kl_weight < 0 or lpips_weight < 0:
            raise ValueError(f"model.kl_weight and model.lpips_weight must be >= 0, got {kl_weight}, {lpips_weight}")
        self.net, self.kl_weight, self.reconstruction_loss = net, kl_weight, reconstruction_loss
        self.lpips_weight, self.num_logged_images, self.warmup_steps = lpips_weight, num_logged_images, warmup_steps
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self._lpips = []  # kept out of the module tree: frozen, not checkpointed
        if lpips_weight > 0:
            from diffexp.metrics.scores import lpips_model

            self._lpips.append(lpips_model(lpips_net).requires_grad_(False))
        self.run_config: dict | None = None

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
        if batch_idx == 0 and self.num_logged_images and not self.trainer.sanity_checking:
            from diffexp.callbacks.images import log_images

            k = min(self.num_logged_images, n)
            log_images(self.trainer, "reconstructions", torch.cat([x[:k], out["x_hat"][:k].clamp(-1, 1)]), nrow=k)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of x, clamped to [-1, 1]."""
        return self.net(x, sample_posterior=False)[0].clamp(-1, 1)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """The :class:`AutoencoderKL` of a ``model=vae`` checkpoint, rebuilt from the config inside it."""
    checkpoint = read_checkpoint(path, "vae.ckpt")
    model_cfg = checkpoint[CONFIG_KEY].get("model", {})
    if not str(model_cfg.get("_target_", "")).endswith("VAETraining"):
        raise ValueError(f"vae.ckpt={str(path)!r} holds a {model_cfg.get('_target_')} checkpoint, not a VAE; "
                         f"train one with `python train.py model=vae` (e.g. experiment=shapes_vae)")
    net = AutoencoderKL(**{k: v for k, v in model_cfg["net"].items() if k != "_target_"})
    state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()
