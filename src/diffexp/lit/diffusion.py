"""The diffusion model as a LightningModule: a Gaussian path, an objective, a conditioner, a space and a sampler
factory, composed."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Callable

import torch
from torch import nn

from diffexp.conditioning import Conditioner, Unconditional
from diffexp.data.base import batch_size_of
from diffexp.diffusion import get_prediction, to_x0_eps
from diffexp.guiders import CFG, Guider
from diffexp.lit.base import TrainingModule
from diffexp.lit.distill import STATE_KEY
from diffexp.nets.contract import Denoiser
from diffexp.objectives import Density, MinSNR, NoWeighting, Objective, Weighting
from diffexp.paths import GaussianPath, as_path
from diffexp.precision import at_precision, check_precision
from diffexp.registry import register_part
from diffexp.samplers import DDIMSampler, Sampler, Trajectory, fixed_noise
from diffexp.spaces import PixelSpace

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@register_part
class DiffusionModel(TrainingModule):
    """Trains ``net`` to denoise along a Gaussian path and samples from it.

    It composes declared parts and never asks which kind it holds:

    - ``path`` (:mod:`diffexp.paths`): the forward process x_t = alpha(t) x_0 + sigma(t) eps (DDPM's discrete
      schedules, continuous VP, EDM, flow); the net gets the path's noise input of t;
    - the objective (:class:`diffexp.objectives.Objective`): ``prediction_type``, ``density`` and ``weighting``;
    - ``conditioner`` (:mod:`diffexp.conditioning`): batch -> the net's condition arguments (with dropout
      for classifier-free guidance), the null condition, monitoring conditions, guidance at sampling;
    - ``space`` (:mod:`diffexp.spaces`): pixels, or the latents of a frozen autoencoder;
    - ``sampler``: a partial sampler, completed with the path and the prediction (default DDIM-50).

    Callbacks call only :meth:`sample`, :meth:`monitoring_inputs` and :meth:`log_images`
    (:mod:`diffexp.lit.interface`); scripts and notebooks may also use :meth:`predict_x0`, :meth:`make_sampler`,
    :meth:`denoiser_fn`, :attr:`sample_shape`, :attr:`objective` and the declared interfaces of ``path``,
    ``conditioner`` and ``space``. Editing lives in :mod:`diffexp.editing`, the monitoring grids in
    :mod:`diffexp.monitoring`.

    Args:
        net: the denoiser, called as net(net input, noise input, **conditioner arguments).
        path: the Gaussian path (a :class:`~diffexp.schedules.NoiseSchedule` stands for its discrete DDPM path).
        conditioner: default :class:`diffexp.conditioning.Unconditional`.
        space: default :class:`diffexp.spaces.PixelSpace`.
        prediction_type: ``epsilon`` | ``sample`` | ``v_prediction`` | ``velocity`` | ``edm`` (EDM's preconditioned F,
            with ``sigma_data``) (:mod:`diffexp.diffusion`).
        sigma_data: EDM's data standard deviation (``prediction_type=edm``).
        density: the training-time density (:mod:`diffexp.objectives`; default: DDPM's integer timesteps on a
            discrete path, uniform times on a continuous one).
        weighting: the loss weighting (default none).
        min_snr_gamma: if set, weight the loss by min-SNR-gamma (Hang et al. 2023): ``weighting=min_snr`` spelt as
            the discrete-time code spelt it.
        optimizer, lr_scheduler: partials (:class:`diffexp.lit.base.TrainingModule`).
        guidance_scale, guidance_rescale: defaults for :meth:`sample` on conditional models.
        noise_seed: seeds the per-step time/noise streams (:meth:`step_generator`; train.py passes ``seed``).
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
        distill: a distillation method (``distill=``, :mod:`diffexp.lit.distill`): its loss replaces the objective's,
            against a frozen teacher (attached by train.py) where the method needs one.
    """

    def __init__(
        self,
        net: nn.Module,
        path: GaussianPath,
        conditioner: Conditioner | None = None,
        space: PixelSpace | None = None,
        prediction_type: str = "epsilon",
        sigma_data: float = 0.5,
        density: Density | None = None,
        weighting: Weighting | None = None,
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
        distill=None,
    ):
        super().__init__(optimizer, lr_scheduler)
        if not isinstance(net, Denoiser):
            raise TypeError(f"net={type(net).__name__} does not satisfy the denoiser contract "
                            f"(diffexp.nets.Denoiser: in_channels, image_size, context_dim, num_classes and "
                            f"forward(x, t, class_labels=, context=, context_mask=, pooled=))")
        self.net = net
        self.path = as_path(path)
        self.conditioner = conditioner if conditioner is not None else Unconditional()
        self.space = space if space is not None else PixelSpace()
        self.conditioner.check_net(net)
        self.space.check_net(net)
        self.prediction = get_prediction(prediction_type, sigma_data)
        self.prediction_type = prediction_type
        if min_snr_gamma is not None:
            if weighting is not None and not isinstance(weighting, NoWeighting):
                raise ValueError(f"model.min_snr_gamma={min_snr_gamma} and weighting={weighting!r} both set the loss "
                                 f"weighting; keep one (weighting=min_snr weighting.gamma=G is the same as "
                                 f"model.min_snr_gamma=G)")
            if isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float)) or not min_snr_gamma > 0:
                raise ValueError(f"model.min_snr_gamma must be positive or null, got {min_snr_gamma}")
            weighting = MinSNR(min_snr_gamma)
        self.min_snr_gamma = min_snr_gamma
        self.objective = Objective(self.path, self.prediction, density, weighting)
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
        self.make_sampler()  # bad sampler settings fail now, not at the first sample grid
        self.lora = None
        self.add_lora(lora)
        self.distill = distill
        if distill is not None:
            distill.bind(self)

    @property
    def schedule(self):
        """The noise schedule of a discrete (DDPM) path."""
        schedule = getattr(self.path, "schedule", None)
        if schedule is None:
            raise AttributeError(f"this model's path ({self.path!r}) is continuous: it has no discrete noise schedule "
                                 f"(use model.path)")
        return schedule

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
    def forward(self, x: torch.Tensor, noise_input: torch.Tensor, **cond) -> torch.Tensor:
        """The net's raw output at its own inputs (the path's noise input, not t: see :meth:`denoiser_fn`)."""
        return self.net(x, noise_input, **cond)

    def setup(self, stage: str) -> None:
        """Fit the conditioner to the data (e.g. a learned tokenizer's vocabulary, monitoring captions); apply
        the memory format and compilation (``compile=auto``: on a CUDA device)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None:
            self.conditioner.fit(datamodule)
        on_cuda = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        self.speed_up(compile=on_cuda if self.compile_net == "auto" else self.compile_net)
        if self.distill is not None and stage == "fit":
            self.distill.setup(self)

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
        so every rank draws its own times and noise, and a resumed run draws what an uninterrupted
        one would. None when the module is used outside a Trainer (global RNG)."""
        if self._trainer is None:
            return None
        index = self.trainer.global_step if index is None else index
        seed = (((self.noise_seed * 1_000_003 + stream) * 1_000_003 + index) * 1_009 + self.global_rank) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def loss(self, batch: dict, drop_conditioning: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """The objective (:class:`~diffexp.objectives.Objective`) on a batch: times and noise come from ``generator``,
        then the conditioning dropout. With ``distill`` its loss instead."""
        if self.distill is not None:
            return self.distill.loss(self, batch, drop_conditioning, generator)
        x0 = self.space.from_batch(batch, generator)

        def net_fn(x, noise_input):  # the conditions drawn after the objective's times and noise
            cond = self.conditioner.from_batch(batch, drop_conditioning, generator, self.device)
            return self.raw_fn(cond)(x, noise_input)

        return self.objective.loss(net_fn, x0, generator)

    def raw_fn(self, cond: dict) -> Callable:
        """(net input, noise input) -> the net's raw output with the condition arguments ``cond`` bound (in the
        configured memory format): what objectives call."""
        def fn(x, noise_input):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x, noise_input, **cond)

        return fn

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.distill is not None:
            self.distill.on_train_batch_start(self)

    def on_train_end(self) -> None:
        if self.distill is not None:
            self.distill.on_train_end(self)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, generator=self.step_generator())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size_of(batch))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the same t and noise for a batch at every validation: val/loss moves only with the weights
        loss = self.loss(batch, drop_conditioning=False, generator=self.step_generator(stream=1, index=batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size_of(batch))

    def denoiser_fn(self, precision: str = "auto") -> Callable:
        """(x_t, t, **conditions) -> the model's prediction (of ``prediction.sampler_type``): the net at ``precision``
        (:meth:`resolved_precision`) called with the path's noise input, through the prediction's preconditioning."""
        return self.prediction.model_fn(self.net_at(precision), self.path)

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, **conditions) -> torch.Tensor:
        """The denoised estimate x0_hat(x_t, t) in model space implied by the net's prediction (eval mode,
        no guidance); without conditions, the unconditional prediction."""
        was_training = self.training
        self.eval()
        try:
            given = self.conditioner.check_conditions(conditions)
            encode = self.conditioner.encode if given else (lambda _, n, device: self.conditioner.null(n, device))
            pred = self.denoiser_fn(self.sample_precision)(x_t, t, **encode(given, len(x_t), self.device))
            alpha, sigma = self.path.coefficients(t, x_t)
            return to_x0_eps(pred, x_t, alpha, sigma, self.prediction.sampler_type, self.path.variance_preserving)[0]
        finally:
            self.train(was_training)

    # --- sampling -------------------------------------------------------------------------------
    def make_sampler(self, sampler: Callable[..., Sampler] | Sampler | None = None) -> Sampler:
        """A sampler for this model: an instance as is, or a partial completed with the path and the prediction.

        In an unbounded space (latents) ``clip_sample`` is turned off in a copy: it clamps x0 to the pixel
        range [-1, 1], which would cut off latents. The sampler passed in is never changed.
        """
        if not isinstance(sampler, Sampler):
            sampler = (sampler or self.sampler_factory)(path=self.path, prediction_type=self.prediction.sampler_type)
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
        """The denoiser called at ``precision`` (:func:`diffexp.precision.at_precision`), returning fp32."""
        return at_precision(self.net, self.resolved_precision(precision), self.device.type)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_T: the space the net denoises."""
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    def monitoring_inputs(self, n: int, seed: int, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(x_T, conditions) of the fixed monitoring samples numbered ``indices`` (default 0..n-1) out of ``n``:
        unit noise from ``seed`` (:func:`diffexp.samplers.fixed_noise`) and the conditioner's monitoring
        conditions, so sample i is the same in every grid, run and rank."""
        indices = torch.arange(n) if indices is None else indices
        return fixed_noise(n, self.sample_shape, seed)[indices], self.conditioner.for_sampling(indices)

    def guider_for(self, guider: Guider | None = None, guidance_scale: float | None = None,
                   guidance_rescale: float | None = None) -> Guider:
        """The guider a sampling run uses: ``guider`` with its options left None filled from ``guidance_scale`` and
        ``guidance_rescale`` (each None: the model's); no guider: classifier-free guidance
        (:class:`~diffexp.guiders.CFG`) at those."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        rescale = self.guidance_rescale if guidance_rescale is None else guidance_rescale
        if guider is None:
            return CFG(scale, rescale)
        if not isinstance(guider, Guider):
            raise TypeError(f"guider must be a diffexp.guiders.Guider, got {type(guider).__name__}")
        return guider.with_defaults(scale, rescale)

    def guide_inputs(self, guider: Guider, n: int, conditions: dict, precision: str) -> tuple | None:
        """(net function, condition arguments) of the guider's second model (autoguidance), or None."""
        if not guider.needs_guide:
            return None
        guide = getattr(guider, "guide_model", None)
        if guide is None:
            raise ValueError(f"guider={guider.name} needs its guide model: load it with diffexp.api.make_guider (or "
                             f"guider.guide_ckpt=CKPT in sample.py)")
        given = guide.conditioner.check_conditions(conditions)
        null = not given and not guide.conditioner.requires_conditions
        cond = guide.conditioner.null(n, self.device) if null else guide.conditioner.encode(given, n, self.device)
        return guide.denoiser_fn(precision), cond

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
        guider: Guider | None = None,
        **conditions,
    ) -> torch.Tensor | Trajectory:
        """Draw ``n`` images with ``sampler`` (default: the configured one), clamped to [-1, 1].

        ``x_T``: unit noise to start from (the sampler scales it to the path's prior; with ``start_step`` > 0, x at
        that step itself). ``conditions`` are the conditioner's (``class_labels=`` one per image, ``captions=`` one
        per image); conditional models apply classifier-free guidance with ``guidance_scale`` (default: the
        model's; 1 = none). With ``return_trajectory`` the intermediate x_t and predicted x0 are returned unclamped,
        as images (latent models decode them). ``start_step``/``on_step``/``jump_length``/``jump_n_sample`` go to the
        sampler (:meth:`diffexp.samplers.Sampler.sample`) and act in the model's space (``space.encode`` of an
        image). ``precision`` (default ``sample_precision``) is that of the denoiser calls; the sampler computes in
        fp32. ``net_conditions``: the net's condition arguments given directly, one per image, instead of
        ``conditions`` (e.g. interpolated text embeddings), guided against the null condition.
        ``observe(i, t, x_t, x0)`` sees each step's x_t and predicted x_0 as images (decoded for latent models) while
        sampling runs. ``guider``: a :class:`diffexp.guiders.Guider` in place of CFG (:meth:`guider_for`); the net's
        forward passes per image of the run are left in ``last_net_passes`` (CFG: two per model evaluation).
        """
        was_training = self.training
        self.eval()
        try:
            guider = self.guider_for(guider, guidance_scale, guidance_rescale)
            denoiser = self.denoiser_fn(precision or self.sample_precision)
            guide = self.guide_inputs(guider, n, conditions, precision or self.sample_precision)
            kind = self.prediction.sampler_type
            if net_conditions is not None:
                self.conditioner.check_conditions(conditions)
                model_fn = guider.bind(denoiser, net_conditions, self.conditioner.null(n, self.device), self.path,
                                       kind, *(guide or (None, None)))
            else:
                model_fn = self.conditioner.model_fn(denoiser, n, conditions, guider, self.path, kind, self.device,
                                                     guide)
            sampler = self.make_sampler(sampler)
            if guider.needs_pair_sampler and not sampler.steps_from_pair:
                from diffexp.samplers import SAMPLERS

                fitting = sorted(name for name, cls in SAMPLERS.items() if getattr(cls, "steps_from_pair", False))
                raise ValueError(f"guider={guider.name} needs a sampler that steps from the pair (x0, eps) alone: "
                                 f"{fitting}; {type(sampler).__name__} steps from x_t")
            result = sampler.sample(
                model_fn, (n, *self.sample_shape), x_T=x_T, generator=generator, device=self.device,
                progress=progress, return_trajectory=return_trajectory, start_step=start_step, on_step=on_step,
                jump_length=jump_length, jump_n_sample=jump_n_sample,
                observe=None if observe is None else
                lambda i, t, x, x0: observe(i, t, self.space.decode(x), self.space.decode(x0)))
            self.last_net_passes = model_fn.passes
            if isinstance(result, Trajectory):
                result.xs = [self.space.decode(x) for x in result.xs]
                result.x0s = [self.space.decode(x) for x in result.x0s]
                result.sample = self.space.decode(result.sample).clamp(-1, 1)
                return result
            return self.space.decode(result).clamp(-1, 1)
        finally:
            self.train(was_training)

    # --- images for callbacks -------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict | None, **options) -> dict[str, torch.Tensor]:
        """Images that show what the model does (:func:`diffexp.monitoring.log_images`)."""
        from diffexp.monitoring import log_images

        return log_images(self, batch, **options)

    # --- checkpoint -----------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Bring an older checkpoint to the current layout (:func:`diffexp.checkpoints.upgrade_checkpoint`), the
        weights of a VAE it did not carry taken from this model (:func:`diffexp.checkpoints.fill_autoencoder`)."""
        from diffexp.checkpoints import fill_autoencoder, upgrade_checkpoint

        upgrade_checkpoint(checkpoint)
        fill_autoencoder(checkpoint["state_dict"], self.state_dict())
        if self.distill is not None and STATE_KEY in checkpoint:
            self.distill.load_state_dict(checkpoint[STATE_KEY], model=self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.distill is not None:
            checkpoint[STATE_KEY] = self.distill.state_dict()
