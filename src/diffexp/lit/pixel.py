"""Pixel-space diffusion as a LightningModule."""
from __future__ import annotations

from functools import partial
from typing import Callable

import lightning as L
import torch
from torch import nn

from diffexp.diffusion import (check_prediction_type, diffusion_loss, prediction_to_x0_eps, q_sample,
                               training_target)
from diffexp.guidance import guided_model
from diffexp.lit.checkpoint import CONFIG_KEY
from diffexp.samplers import DDIMSampler, Sampler, Trajectory
from diffexp.schedules import NoiseSchedule


def batch_size(batch: dict) -> int:
    return len(batch["latent"] if "latent" in batch else batch["image"])


class PixelDiffusion(L.LightningModule):
    """Trains ``net`` to denoise: loss = w(t) * || net(x_t, t) - target ||^2 with t ~ U{0..T-1}.

    Args:
        net: the denoiser, called as net(x_t, t, class_labels=...).
        schedule: the noise schedule (:func:`diffexp.schedules.get_schedule`).
        prediction_type: ``epsilon`` | ``sample`` | ``v_prediction``.
        min_snr_gamma: if set, weight the loss by min-SNR-gamma (Hang et al. 2023).
        optimizer: a partial optimizer, called with the parameters (default AdamW, lr 2e-4).
        warmup_steps: linear learning-rate warm-up over this many steps.
        sampler: a partial sampler, called with schedule and prediction_type (default DDIM-50).
        class_conditional: feed ``batch["label"]`` to the net, dropped with probability ``p_uncond``.
        text_encoder: a :class:`diffexp.text.TextEncoder`; captions (``batch["caption"]``) are
            encoded and fed to the net's cross-attention; each caption is replaced by "" with
            probability ``p_uncond`` (conditioning dropout for classifier-free guidance).
        guidance_scale, guidance_rescale: defaults for :meth:`sample` on conditional models.
        noise_seed: seeds the per-step timestep/noise streams (:meth:`step_generator`; train.py passes ``seed``).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        min_snr_gamma: float | None = None,
        optimizer: Callable | None = None,
        warmup_steps: int = 0,
        sampler: Callable[..., Sampler] | None = None,
        class_conditional: bool = False,
        p_uncond: float = 0.1,
        text_encoder: nn.Module | None = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        noise_seed: int = 0,
    ):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.min_snr_gamma = min_snr_gamma
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=2e-4)
        if warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.sampler_factory = sampler or partial(DDIMSampler, steps=50)
        if class_conditional and getattr(net, "class_emb", None) is None:
            raise ValueError("model.class_conditional=true needs a U-Net built with num_classes (unet.num_classes)")
        self.class_conditional = class_conditional
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"model.p_uncond must lie in [0, 1], got {p_uncond}")
        self.p_uncond = p_uncond
        self.text_encoder = text_encoder
        if text_encoder is not None and getattr(net, "context_dim", None) != text_encoder.dim:
            raise ValueError(f"unet.context_dim={getattr(net, 'context_dim', None)} must equal the text encoder's "
                             f"width {text_encoder.dim}")
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.noise_seed = noise_seed
        self.example_captions: list[str] = []
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float(), persistent=False)
        self.register_buffer("snr", schedule.snr.float(), persistent=False)
        self.run_config: dict | None = None  # the composed config, saved in every checkpoint

    # --- training -------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x_t, t, **cond)

    @property
    def conditional(self) -> bool:
        return self.class_conditional or self.text_encoder is not None

    def sampling_conditions(self, n: int) -> dict:
        """Fixed conditioning for ``n`` monitoring samples (grids, FID): labels 0..C-1 cycling, or the
        first validation captions cycling (remembered from setup and saved in checkpoints)."""
        if self.text_encoder is not None:
            captions = self.example_captions or [""]
            return {"captions": [captions[i % len(captions)] for i in range(n)]}
        if self.class_conditional:
            return {"class_labels": torch.arange(n) % self.net.num_classes}
        return {}

    def setup(self, stage: str) -> None:
        """Remember example captions; build a data-derived tokenizer (learned text encoder)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.text_encoder is not None and datamodule is not None and not self.example_captions:
            datamodule.setup("fit")
            captions = getattr(datamodule.val_set, "captions", None)
            if not captions:
                raise ValueError(f"a text encoder needs captions, but data={datamodule.name} has none")
            self.example_captions = list(captions[:64])
        encoder = self.text_encoder
        if encoder is None or not getattr(encoder, "trainable", False) or len(getattr(encoder, "vocab", [])) > 3:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            datamodule.setup("fit")
            captions = getattr(datamodule.train_set, "captions", None)
            if not captions:
                raise ValueError(f"a text encoder needs captions, but data={datamodule.name} has none")
            encoder.fit_vocabulary(captions)

    def encode_text(self, captions: list[str]) -> dict:
        return self.text_encoder(list(captions)).to(self.device).as_kwargs()

    def conditioning(self, batch: dict, drop: bool, generator: torch.Generator | None = None) -> dict:
        """Keyword arguments for the net from a batch; labels/captions dropped at rate p_uncond when ``drop``."""
        if self.text_encoder is not None:
            captions = list(batch["caption"])
            if drop and self.p_uncond > 0:
                keep = (torch.rand(len(captions), generator=generator, device=self.device) >= self.p_uncond).cpu()
                captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
            return self.encode_text(captions)
        if not self.class_conditional:
            return {}
        labels = batch["label"].clone()
        if drop and self.p_uncond > 0:
            mask = torch.rand(labels.shape, device=labels.device, generator=generator) < self.p_uncond
            labels[mask] = self.net.num_classes
        return {"class_labels": labels}

    # --- the space diffusion runs in (pixels here; latents in LatentDiffusion) ------------------------
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the space the net denoises (identity for pixel diffusion)."""
        return images

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_model_space` (identity for pixel diffusion)."""
        return x

    def diffusion_input(self, batch: dict) -> torch.Tensor:
        """x_0 of a training batch, in model space."""
        return self.to_model_space(batch["image"])

    def step_generator(self, stream: int = 0, index: int | None = None) -> torch.Generator | None:
        """The generator for one training/validation step: seeded by (``noise_seed``, stream, step, rank),
        so every rank draws its own timesteps and noise, and a resumed run draws what an uninterrupted
        one would. None when the module is used outside a Trainer (global RNG)."""
        if self._trainer is None:
            return None
        index = self.trainer.global_step if index is None else index
        seed = (((self.noise_seed * 1_000_003 + stream) * 1_000_003 + index) * 1_009 + self.global_rank) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def loss(self, batch: dict, drop_conditioning: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion loss of a batch; t, noise and conditioning dropout come from ``generator``."""
        x0 = self.diffusion_input(batch)
        n = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        target = training_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)
        pred = self.net(x_t, t, **self.conditioning(batch, drop_conditioning, generator))
        return diffusion_loss(pred, target, t, self.snr, self.prediction_type, self.min_snr_gamma)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, generator=self.step_generator())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size(batch))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the same t and noise for a batch at every validation: val/loss moves only with the weights
        loss = self.loss(batch, drop_conditioning=False, generator=self.step_generator(stream=1, index=batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size(batch))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                   captions: list[str] | None = None) -> torch.Tensor:
        """The denoised estimate x0_hat(x_t, t) implied by the net's prediction (eval mode, no grad).

        Text models without ``captions`` use the empty caption (the unconditional prediction).
        """
        was_training = self.training
        self.eval()
        try:
            cond = {"class_labels": class_labels} if class_labels is not None else {}
            if self.text_encoder is not None:
                cond = self.encode_text(captions if captions is not None else [""] * len(x_t))
            pred = self.net(x_t, t, **cond)
            return prediction_to_x0_eps(pred, x_t, t, self.alphas_cumprod, self.prediction_type)[0]
        finally:
            self.train(was_training)

    # --- sampling -------------------------------------------------------------------------------
    def make_sampler(self, sampler: Callable[..., Sampler] | Sampler | None = None) -> Sampler:
        """A sampler for this model: an instance as is, or a partial completed with schedule and prediction_type."""
        if isinstance(sampler, Sampler):
            return sampler
        return (sampler or self.sampler_factory)(schedule=self.schedule, prediction_type=self.prediction_type)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: Callable[..., Sampler] | Sampler | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        progress: bool | None = None,
        return_trajectory: bool = False,
        captions: list[str] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
    ) -> torch.Tensor | Trajectory:
        """Draw ``n`` images with ``sampler`` (default: the configured one), clamped to [-1, 1].

        Conditional models take ``class_labels`` or ``captions`` (one per image) and apply
        classifier-free guidance with ``guidance_scale`` (default: the model's; 1 = none).
        With ``return_trajectory`` the intermediate x_t and predicted x0 are returned unclamped
        (as images: latent models decode them).
        """
        was_training = self.training
        self.eval()
        try:
            model_fn, kwargs = self.net, {}
            if self.text_encoder is not None:
                if captions is None or len(captions) != n:
                    raise ValueError(f"this model is text-conditioned: pass {n} captions (prompt=...)")
                cond, uncond = self.encode_text(captions), self.encode_text([""] * n)
            elif class_labels is not None:
                cond = {"class_labels": class_labels.to(self.device)}
                uncond = {"class_labels": torch.full_like(cond["class_labels"], self.net.num_classes)}
            else:
                cond = uncond = None
            if cond is not None:
                scale = self.guidance_scale if guidance_scale is None else guidance_scale
                rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
                model_fn = guided_model(self.net, cond, uncond, scale, rescale)
            result = self.make_sampler(sampler).sample(
                model_fn, (n, *self.sample_shape), x_T=x_T, generator=generator, device=self.device,
                progress=progress, return_trajectory=return_trajectory, model_kwargs=kwargs,
            )
            if isinstance(result, Trajectory):
                result.xs = [self.to_images(x) for x in result.xs]
                result.x0s = [self.to_images(x) for x in result.x0s]
                result.sample = self.to_images(result.sample).clamp(-1, 1)
                return result
            return self.to_images(result).clamp(-1, 1)
        finally:
            self.train(was_training)

    # --- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        checkpoint["diffexp_example_captions"] = self.example_captions

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.example_captions = list(checkpoint.get("diffexp_example_captions", []))
