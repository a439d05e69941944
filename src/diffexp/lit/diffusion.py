"""The diffusion model as a LightningModule, composed of a conditioner, a space and a sampler factory."""
from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffexp.conditioning import Conditioner, Unconditional
from diffexp.diffusion import (check_prediction_type, diffusion_loss, prediction_to_x0_eps, q_sample, slerp,
                               training_target)
from diffexp.guidance import guided_model
from diffexp.lit.base import TrainingModule
from diffexp.samplers import DDIMSampler, Sampler, Trajectory, fixed_noise
from diffexp.samplers.base import randn
from diffexp.schedules import NoiseSchedule, alpha_bar_at
from diffexp.spaces import PixelSpace

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def edit_start(sampler: Sampler, strength: float) -> int:
    """The step an SDEdit at ``strength`` starts from: the last round(strength * S) of the sampler's S steps run
    (halves rounded up)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1] (0: the input, 1: from noise), got {strength!r}")
    steps = len(sampler.timesteps)
    return steps - math.floor(strength * steps + 0.5)  # halves round up: 0.5 of 5 steps runs 3


def check_precision(value, option: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"{option} must be one of {list(PRECISIONS)}, got {value!r}")
    return value


class DiffusionModel(TrainingModule):
    """Trains ``net`` to denoise: loss = w(t) * || net(x_t, t, **cond) - target ||^2 with t ~ U{0..T-1}.

    It composes three declared parts and never asks which kind it holds:

    - ``conditioner`` (:mod:`diffexp.conditioning`): batch -> the net's condition arguments (with dropout
      for classifier-free guidance), the null condition, monitoring conditions, guidance at sampling;
    - ``space`` (:mod:`diffexp.spaces`): pixels, or the latents of a frozen autoencoder;
    - ``sampler``: a partial sampler, completed with the schedule and prediction type (default DDIM-50).

    Callbacks call only :meth:`sample`, :meth:`monitoring_inputs` and :meth:`log_images`
    (:mod:`diffexp.lit.interface`); scripts and notebooks may also use :meth:`predict_x0`, :meth:`make_sampler`,
    :attr:`sample_shape` and the declared interfaces of ``conditioner`` and ``space``.

    Args:
        net: the denoiser, called as net(x_t, t, **conditioner arguments).
        schedule: the noise schedule (:func:`diffexp.schedules.get_schedule`).
        conditioner: default :class:`diffexp.conditioning.Unconditional`.
        space: default :class:`diffexp.spaces.PixelSpace`.
        prediction_type: ``epsilon`` | ``sample`` | ``v_prediction``.
        min_snr_gamma: if set, weight the loss by min-SNR-gamma (Hang et al. 2023).
        optimizer, lr_scheduler: partials (:class:`diffexp.lit.base.TrainingModule`).
        guidance_scale, guidance_rescale: defaults for :meth:`sample` on conditional models.
        noise_seed: seeds the per-step timestep/noise streams (:meth:`step_generator`; train.py passes ``seed``).
        compile: ``torch.compile`` the denoiser in place (``nn.Module.compile``: state-dict keys unchanged, so EMA,
            checkpoints, DDP and resume see the plain net): ``auto`` = when training on a CUDA device.
        compile_mode: torch.compile's ``mode`` (null: its default; ``reduce-overhead`` adds CUDA graphs,
            ``max-autotune`` searches kernels longer).
        channels_last: keep the denoiser's weights and inputs in channels-last memory format.
        sample_precision: precision of the denoiser calls in :meth:`sample` (the sampler's arithmetic stays fp32):
            ``auto`` = the Trainer's (bf16 under ``bf16-mixed``); outside one bf16 on CUDA, fp32 on CPU; ``bf16`` | ``fp16`` |
            ``fp32``.
        lora: ``model.lora`` (:class:`diffexp.lora.LoraSettings`): with ``rank`` > 0 only low-rank adapters on the
            target layers of the denoiser (and of a learned text encoder) train; everything else is frozen.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        conditioner: Conditioner | None = None,
        space: PixelSpace | None = None,
        prediction_type: str = "epsilon",
        min_snr_gamma: float | None = None,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        sampler: Callable[..., Sampler] | None = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        noise_seed: int = 0,
        compile: bool | str = "auto",
        compile_mode: str | None = None,
        channels_last: bool = False,
        sample_precision: str = "auto",
        lora: dict | None = None,
    ):
        super().__init__(optimizer, lr_scheduler)
        self.net = net
        self.schedule = schedule
        self.conditioner = conditioner if conditioner is not None else Unconditional()
        self.space = space if space is not None else PixelSpace()
        self.conditioner.check_net(net)
        self.space.check_net(net)
        self.prediction_type = check_prediction_type(prediction_type)
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"model.min_snr_gamma must be positive or null, got {min_snr_gamma}")
        self.min_snr_gamma = min_snr_gamma
        self.sampler_factory = sampler or partial(DDIMSampler, steps=50)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"model.guidance_scale must be a number >= 0 (1: no guidance), got {guidance_scale!r}")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) \
                or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"model.guidance_rescale must lie in [0, 1], got {guidance_rescale!r}")
        self.guidance_scale, self.guidance_rescale = guidance_scale, guidance_rescale
        self.noise_seed = noise_seed
        if compile not in (True, False, "auto"):
            raise ValueError(f"model.compile must be true, false or auto (on when training on a CUDA GPU), got {compile!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode must be one of {list(COMPILE_MODES)}, got {compile_mode!r}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"model.channels_last must be true or false, got {channels_last!r}")
        self.compile_net, self.compile_mode, self.channels_last = compile, compile_mode, channels_last
        self.sample_precision = check_precision(sample_precision, "model.sample_precision")
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.float(), persistent=False)
        self.register_buffer("snr", schedule.snr.float(), persistent=False)
        self.make_sampler()  # bad sampler settings fail now, not at the first sample grid
        self.lora = None
        self.add_lora(lora)

    def add_lora(self, lora) -> None:
        """Add LoRA adapters (:mod:`diffexp.lora`, ``peft``) to the denoiser and to a trainable text encoder, then
        freeze every other parameter. ``lora``: :class:`~diffexp.lora.LoraSettings` or its config (rank 0: no-op)."""
        from diffexp.lora import LoraSettings, add_lora, is_adapter_key

        settings = LoraSettings.from_config(lora)
        if settings.rank == 0:
            return
        if self.lora is not None:
            raise ValueError("this model already has LoRA adapters (merge them first to add others)")
        self.lora_layers = add_lora({"net": self.net, **self.conditioner.trainable_modules()}, settings)
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_adapter_key(name))
        self.lora = settings

    def adapter_state_dict(self, state: dict | None = None) -> dict:
        """The LoRA adapters' tensors of ``state`` (default: this model's state dict) and the non-tensor state a
        sampler needs with them (a learned tokenizer's vocabulary, monitoring captions)."""
        from diffexp.lora import is_adapter_key

        state = self.state_dict() if state is None else state
        return {k: v for k, v in state.items() if is_adapter_key(k) or k.endswith("_extra_state")}

    # --- training -------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x_t, t, **cond)

    def setup(self, stage: str) -> None:
        """Fit the conditioner to the data (e.g. a learned tokenizer's vocabulary, monitoring captions); apply
        the memory format and compilation (``compile=auto``: on a CUDA device)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:
            self.conditioner.fit(datamodule)
        on_cuda = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        self.speed_up(compile=on_cuda if self.compile_net == "auto" else self.compile_net)

    def speed_up(self, compile: bool = True, mode: str | None = None) -> None:
        """Channels-last weights (if configured) and ``torch.compile`` of the denoiser in place (once; keys and
        parameters stay those of the plain net). ``mode`` defaults to ``compile_mode``."""
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile(mode=mode or self.compile_mode)

    def on_fit_start(self) -> None:
        """Fit the space to the training data (e.g. the latent scale); the datamodule is set up by now."""
        message = self.space.fit(self.trainer.datamodule)
        if message:
            self.print(f"[diffexp] {message}")

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
        x0 = self.space.from_batch(batch)
        n = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        target = training_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)
        cond = self.conditioner.from_batch(batch, drop_conditioning, generator, self.device)
        pred = self.net(x_t, t, **cond)
        return diffusion_loss(pred, target, t, self.snr, self.prediction_type, self.min_snr_gamma)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, generator=self.step_generator())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the same t and noise for a batch at every validation: val/loss moves only with the weights
        loss = self.loss(batch, drop_conditioning=False, generator=self.step_generator(stream=1, index=batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, **conditions) -> torch.Tensor:
        """The denoised estimate x0_hat(x_t, t) in model space implied by the net's prediction (eval mode,
        no guidance); without conditions, the unconditional prediction."""
        was_training = self.training
        self.eval()
        try:
            given = self.conditioner.check_conditions(conditions)
            encode = self.conditioner.encode if given else (lambda _, n, device: self.conditioner.null(n, device))
            pred = self.net_at(self.sample_precision)(x_t, t, **encode(given, len(x_t), self.device))
            return prediction_to_x0_eps(pred, x_t, t, self.alphas_cumprod, self.prediction_type)[0]
        finally:
            self.train(was_training)

    # --- sampling -------------------------------------------------------------------------------
    def make_sampler(self, sampler: Callable[..., Sampler] | Sampler | None = None) -> Sampler:
        """A sampler for this model: an instance as is, or a partial completed with schedule and prediction_type.

        In an unbounded space (latents) ``clip_sample`` is turned off in a copy: it clamps x0 to the pixel
        range [-1, 1], which would cut off latents. The sampler passed in is never changed.
        """
        if not isinstance(sampler, Sampler):
            sampler = (sampler or self.sampler_factory)(schedule=self.schedule, prediction_type=self.prediction_type)
        if sampler.clip_sample and not self.space.bounded:
            warnings.warn("sampler.clip_sample=true clamps x0 to [-1, 1]; latents are unbounded, so latent models "
                          "sample with clip_sample=false", stacklevel=2)
            sampler = sampler.with_options(clip_sample=False)
        return sampler

    def resolved_precision(self, precision: str = "auto") -> str:
        """``auto``: the Trainer's mixed precision when attached (``bf16-mixed`` -> bf16, ``16-mixed`` -> fp16),
        else bf16 on a CUDA device and fp32 elsewhere; other values as given."""
        if check_precision(precision, "precision") != "auto":
            return precision
        if self._trainer is None:
            return "bf16" if self.device.type == "cuda" else "fp32"
        trainer_precision = str(self.trainer.precision)
        return "bf16" if "bf16" in trainer_precision else "fp16" if trainer_precision.startswith("16") else "fp32"

    def net_at(self, precision: str = "auto") -> Callable:
        """The denoiser called under autocast at ``precision`` (:meth:`resolved_precision`), returning fp32;
        the plain net for fp32. CPU autocast supports bf16 only, so fp16 runs in fp32 there."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.resolved_precision(precision))
        device_type = self.device.type
        if dtype is None or (device_type == "cpu" and dtype == torch.float16):
            return self.net
        net = self.net

        def low_precision_net(x, t, **kwargs):
            with torch.autocast(device_type, dtype=dtype):
                return net(x, t, **kwargs).float()

        return low_precision_net

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_T: the space the net denoises."""
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    def monitoring_inputs(self, n: int, seed: int, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(x_T, conditions) of the fixed monitoring samples numbered ``indices`` (default 0..n-1) out of ``n``:
        noise from ``seed`` (:func:`diffexp.samplers.fixed_noise`) and the conditioner's monitoring
        conditions, so sample i is the same in every grid, run and rank."""
        indices = torch.arange(n) if indices is None else indices
        return fixed_noise(n, self.sample_shape, seed)[indices], self.conditioner.for_sampling(indices)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: Callable[..., Sampler] | Sampler | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool | None = None,
        return_trajectory: bool = False,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        start_step: int = 0,
        on_step=None,
        precision: str | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        net_conditions: dict | None = None,
        observe=None,
        **conditions,
    ) -> torch.Tensor | Trajectory:
        """Draw ``n`` images with ``sampler`` (default: the configured one), clamped to [-1, 1].

        ``conditions`` are the conditioner's (``class_labels=`` one per image, ``captions=`` one per image);
        conditional models apply classifier-free guidance with ``guidance_scale`` (default: the model's;
        1 = none). With ``return_trajectory`` the intermediate x_t and predicted x0 are returned unclamped,
        as images (latent models decode them). ``start_step``/``on_step``/``jump_length``/``jump_n_sample`` go to the sampler
        (:meth:`diffexp.samplers.Sampler.sample`) and act in the model's space (``space.encode`` of an image).
        ``precision`` (default ``sample_precision``) is that of the denoiser calls; the sampler computes in fp32.
        ``net_conditions``: the net's condition arguments given directly, one per image, instead of ``conditions``
        (e.g. interpolated text embeddings), guided against the null condition. ``observe(i, t, x_t, x0)`` sees each
        step's x_t and predicted x_0 as images (decoded for latent models) while sampling runs.
        """
        was_training = self.training
        self.eval()
        try:
            scale = self.guidance_scale if guidance_scale is None else guidance_scale
            rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
            net = self.net_at(precision or self.sample_precision)
            if net_conditions is not None:
                self.conditioner.check_conditions(conditions)
                model_fn = guided_model(net, net_conditions, self.conditioner.null(n, self.device), scale, rescale)
            else:
                model_fn = self.conditioner.model_fn(net, n, conditions, scale, rescale, self.device)
            result = self.make_sampler(sampler).sample(
                model_fn, (n, *self.sample_shape), x_T=x_T, generator=generator, device=self.device,
                progress=progress, return_trajectory=return_trajectory, start_step=start_step, on_step=on_step,
                jump_length=jump_length, jump_n_sample=jump_n_sample,
                observe=None if observe is None else
                lambda i, t, x, x0: observe(i, t, self.space.decode(x), self.space.decode(x0)))
            if isinstance(result, Trajectory):
                result.xs = [self.space.decode(x) for x in result.xs]
                result.x0s = [self.space.decode(x) for x in result.x0s]
                result.sample = self.space.decode(result.sample).clamp(-1, 1)
                return result
            return self.space.decode(result).clamp(-1, 1)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def edit(self, images: torch.Tensor, strength: float, sampler: Callable[..., Sampler] | Sampler | None = None,
             generator: torch.Generator | None = None, progress: bool | None = None, **sample_options) -> torch.Tensor:
        """Image-to-image, SDEdit (Meng et al. 2022): ``images`` ([-1, 1], N x C x H x W) are encoded into the
        model's space, noised by q(x_t | x_0) to the sampler's timestep at ``strength`` and denoised from there.

        Of the sampler's S steps the last round(strength * S) run: strength 0 returns the images (through the
        autoencoder for latent models), strength 1 starts at the first timestep t_0, where sqrt(abar_{t_0}) of
        the image remains (0 with zero terminal SNR and trailing spacing: then it is sampling from the noise).
        ``sample_options`` go to :meth:`sample` (conditions, guidance, precision); the noise comes from
        ``generator`` (on its device, as in sampling).
        """
        sampler = self.make_sampler(sampler)
        start = edit_start(sampler, strength)
        x0 = self.space.encode(images.to(self.device))
        if start == len(sampler.timesteps):
            return self.space.decode(x0).clamp(-1, 1)
        x_t = self.noised(x0, float(sampler.timesteps[start]), generator)
        return self.sample(len(x0), sampler=sampler, x_T=x_t, start_step=start, progress=progress,
                           generator=generator, **sample_options)

    def noised(self, x0: torch.Tensor, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) at a real timestep t (alpha-bar by
        log-sigma interpolation between integer steps), noise from ``generator``."""
        abar = alpha_bar_at(self.schedule.alphas_cumprod, t).to(x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * randn(x0.shape, generator, self.device)

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, sampler: Callable[..., Sampler] | Sampler | None = None,
                generator: torch.Generator | None = None, progress: bool | None = None, strength: float = 1.0,
                jump_length: int = 10, jump_n_sample: int = 1, **sample_options) -> torch.Tensor:
        """Inpainting by blending: ``mask`` (N or 1, 1, H, W) in [0, 1], 1 = regenerate. The run starts as
        :meth:`edit` at ``strength`` (1: from noise); after every sampler step the known region of x_{t_prev}
        is replaced by q(x_{t_prev} | x_0) of the input, fresh noise each step (x_0 itself after the last step),
        the known-region step of RePaint (Lugmayr et al. 2022). ``jump_n_sample`` > 1 adds RePaint's resampling:
        every ``jump_length`` steps, x is noised back ``jump_length`` steps and those steps are run again,
        ``jump_n_sample - 1`` times (:func:`diffexp.samplers.base.resampling_levels`), so the generated region
        agrees with the known one at its boundary; it costs that many more model evaluations.

        In pixel space the known pixels of the result equal the input exactly. Latent models blend latents with
        the mask downsampled (area) to the latent grid, then blend the decoded result with the input in pixel
        space by the full-resolution mask, so there too the known pixels are the input's.
        """
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, len(images)) \
                or mask.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"mask must be (1 or N, 1, H, W) like the images {tuple(images.shape)}, got "
                             f"{tuple(mask.shape)}")
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = regenerate, 0 = keep)")
        sampler = self.make_sampler(sampler)
        start = edit_start(sampler, strength)
        images, mask = images.to(self.device), mask.to(self.device, images.dtype)
        x0 = self.space.encode(images)
        if start == len(sampler.timesteps):  # no step runs: the input (through the autoencoder)
            return self.space.decode(x0).clamp(-1, 1) * mask + images * (1 - mask)
        keep = 1 - (F.interpolate(mask, size=x0.shape[-2:], mode="area") if x0.shape[-2:] != mask.shape[-2:] else mask)

        def blend_known(i: int, t_prev: float, x_prev: torch.Tensor) -> torch.Tensor:
            known = x0 if t_prev < 0 else self.noised(x0, t_prev, generator)
            return x_prev * (1 - keep) + known * keep

        x_t = self.noised(x0, float(sampler.timesteps[start]), generator)
        out = self.sample(len(x0), sampler=sampler, x_T=x_t, start_step=start, on_step=blend_known, progress=progress,
                          generator=generator, jump_length=jump_length, jump_n_sample=jump_n_sample, **sample_options)
        if not self.space.bounded:  # decoded latents: the known pixels from the input itself
            out = out * mask + images * (1 - mask)
        return out

    @torch.no_grad()
    def interpolate(self, frames: int, x_T: torch.Tensor, sampler: Callable[..., Sampler] | Sampler | None = None,
                    captions: tuple[str, str] | None = None, progress: bool | None = None,
                    **sample_options) -> torch.Tensor:
        """``frames`` images between two samples: the noises ``x_T[0]`` and ``x_T[1]`` interpolated spherically
        (:func:`diffexp.diffusion.slerp`) and, for text models given two ``captions``, their embeddings linearly
        (the conditioner's ``interpolated``), at w = 0, 1/(frames-1), ..., 1, each decoded
        by ``sampler``. With a deterministic sampler (DDIM, eta 0; DPM-Solver++(2M); UniPC) the first and last
        frames are the plain samples of the endpoints, and the row shows how smoothly the model maps its inputs
        to images. ``sample_options`` go to :meth:`sample` (guidance, conditions for all frames, precision)."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an integer >= 2 (the two endpoints and what lies between), got {frames!r}")
        if x_T.ndim != 4 or len(x_T) != 2 or tuple(x_T.shape[1:]) != self.sample_shape:
            raise ValueError(f"x_T must hold the two endpoint noises, (2, {', '.join(map(str, self.sample_shape))}); "
                             f"got {tuple(x_T.shape)}")
        weights = torch.linspace(0, 1, frames)
        noises = slerp(x_T[0], x_T[1], weights.to(x_T.device))
        net_conditions = None
        if captions is not None:
            if isinstance(captions, str) or len(captions) != 2:
                raise ValueError(f"captions must be two prompts (from, to), got {captions!r}")
            net_conditions = self.conditioner.interpolated(tuple(captions), weights, self.device)
        return self.sample(frames, sampler=sampler, x_T=noises.to(self.device), progress=progress,
                           net_conditions=net_conditions, **sample_options)

    # --- images for callbacks -------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict | None, samples: int = 0, timesteps=(), trajectories: int = 0,
                   frames: int = 8, seed: int = 0, sampler=None, **unused) -> dict[str, torch.Tensor]:
        """Images that show what the model does, in [-1, 1]; a 5-D value (rows, columns, C, H, W) is a laid-out
        grid. Options a callback does not set are off; options meant for other modules are ignored.

        - ``samples``: that many monitoring samples (:meth:`monitoring_inputs` with ``seed``);
        - ``timesteps`` with ``batch``: per image, a row of x_t at each t and a row of predicted x0 there
          (noise from ``seed``);
        - ``trajectories``: per sample, a row of x_t along the reverse process (``frames`` columns, x_T ... x_0)
          and a row of the x0 predicted there (noise from ``seed + 1``).
        """
        out = {}
        if samples:
            x_T, cond = self.monitoring_inputs(samples, seed)
            out["samples"] = self.sample(samples, sampler=sampler, x_T=x_T.to(self.device), progress=False, **cond)
        if timesteps and batch is not None:
            out["denoising/forward"] = self.forward_grid(batch["image"], list(timesteps), seed)
        if trajectories:
            out["denoising/reverse"] = self.reverse_grid(trajectories, frames, seed + 1, sampler)
        return out

    def forward_grid(self, images: torch.Tensor, timesteps: list[int], seed: int) -> torch.Tensor:
        """(2 * len(images), len(timesteps), C, H, W): per image a row of x_t, then a row of x0_hat."""
        T = self.schedule.num_timesteps
        bad = [t for t in timesteps if not 0 <= t < T]
        if bad:
            raise ValueError(f"callbacks.denoising_grid.timesteps {bad} outside [0, {T})")
        generator = torch.Generator().manual_seed(seed)
        rows = []
        t = torch.tensor(timesteps, device=self.device)
        for x0 in self.space.encode(images.to(self.device)):
            x0 = x0[None].expand(len(timesteps), *x0.shape)
            noise = torch.randn(x0.shape, generator=generator).to(self.device)
            x_t = q_sample(x0, t, noise, self.alphas_cumprod)
            rows += [self.space.decode(x_t).clamp(-1, 1), self.space.decode(self.predict_x0(x_t, t)).clamp(-1, 1)]
        return torch.stack(rows)

    def reverse_grid(self, n: int, frames: int, seed: int, sampler=None) -> torch.Tensor:
        """(2 * n, frames, C, H, W): per monitoring sample, x_t along the reverse process then the predicted x0."""
        x_T, cond = self.monitoring_inputs(n, seed)
        traj = self.sample(n, sampler=sampler, x_T=x_T.to(self.device), progress=False, return_trajectory=True, **cond)
        pick = torch.linspace(0, len(traj.xs) - 1, frames - 1).round().long().tolist()
        rows = []
        for i in range(n):
            rows.append(torch.stack([traj.xs[k][i] for k in pick] + [traj.sample[i]]).clamp(-1, 1))
            rows.append(torch.stack([traj.x0s[k][i] for k in pick] + [traj.sample[i]]).clamp(-1, 1))
        return torch.stack(rows)

    # --- checkpoint -----------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Bring an older checkpoint to the current layout (:func:`diffexp.checkpoints.upgrade_checkpoint`).
        One written before latent checkpoints carried their autoencoder keeps the weights this model was
        built with (from the VAE file its config names)."""
        from diffexp.checkpoints import upgrade_checkpoint

        upgrade_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("space.autoencoder.") and key not in state:
                state[key] = value
