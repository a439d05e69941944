"""Editing with a trained diffusion model: image-to-image (SDEdit), inpainting (with RePaint's resampling) and
interpolation, written against the model's declared interface (``space``, ``path``, ``conditioner``, ``sample``).

    from diffexp.editing import edit, inpaint, interpolate
    edited = edit(model, images, strength=0.6, sampler=sampler)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from diffexp.diffusion import slerp
from diffexp.samplers import Sampler
from diffexp.samplers.base import randn


def edit_start(sampler: Sampler, strength: float) -> int:
    """The step an SDEdit at ``strength`` starts from: the last round(strength * S) of the sampler's S steps run
    (halves rounded up)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1] (0: the input, 1: from noise), got {strength!r}")
    steps = len(sampler.timesteps)
    return steps - math.floor(strength * steps + 0.5)  # halves round up: 0.5 of 5 steps runs 3


def noised(model, x0: torch.Tensor, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw of the model's forward process q(x_t | x_0) at time ``t`` (:meth:`diffexp.paths.GaussianPath.noised`),
    noise from ``generator`` (on its device, as in sampling)."""
    return model.path.noised(x0, t, randn(x0.shape, generator, model.device))


@torch.no_grad()
def edit(model, images: torch.Tensor, strength: float, sampler: Callable[..., Sampler] | Sampler | None = None,
         generator: torch.Generator | None = None, progress: bool | None = None, **sample_options) -> torch.Tensor:
    """Image-to-image, SDEdit (Meng et al. 2022): ``images`` ([-1, 1], N x C x H x W) are encoded into the
    model's space, noised by q(x_t | x_0) to the sampler's time at ``strength`` and denoised from there.

    Of the sampler's S steps the last round(strength * S) run: strength 0 returns the images (through the
    autoencoder for latent models), strength 1 starts at the first time t_0, where alpha_{t_0} of the image
    remains (0 with zero terminal SNR and trailing spacing, or on the flow path: then it is sampling from the
    noise). ``sample_options`` go to ``model.sample`` (conditions, guidance, precision).
    """
    sampler = model.make_sampler(sampler)
    start = edit_start(sampler, strength)
    x0 = model.space.encode(images.to(model.device))
    if start == len(sampler.timesteps):
        return model.space.decode(x0).clamp(-1, 1)
    x_t = noised(model, x0, float(sampler.timesteps[start]), generator)
    return model.sample(len(x0), sampler=sampler, x_T=x_t, start_step=start, progress=progress, generator=generator,
                        **sample_options)


@torch.no_grad()
def inpaint(model, images: torch.Tensor, mask: torch.Tensor, sampler: Callable[..., Sampler] | Sampler | None = None,
            generator: torch.Generator | None = None, progress: bool | None = None, strength: float = 1.0,
            jump_length: int = 10, jump_n_sample: int = 1, **sample_options) -> torch.Tensor:
    """Inpainting by blending: ``mask`` (N or 1, 1, H, W) in [0, 1], 1 = regenerate. The run starts as
    :func:`edit` at ``strength`` (1: from noise); after every sampler step the known region of x_{t_prev}
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
    sampler = model.make_sampler(sampler)
    start = edit_start(sampler, strength)
    images, mask = images.to(model.device), mask.to(model.device, images.dtype)
    x0 = model.space.encode(images)
    if start == len(sampler.timesteps):  # no step runs: the input (through the autoencoder)
        return model.space.decode(x0).clamp(-1, 1) * mask + images * (1 - mask)
    keep = 1 - (F.interpolate(mask, size=x0.shape[-2:], mode="area") if x0.shape[-2:] != mask.shape[-2:] else mask)
    clean = sampler.path.clean_time

    def blend_known(i: int, t_prev: float, x_prev: torch.Tensor) -> torch.Tensor:
        known = x0 if t_prev == clean else noised(model, x0, t_prev, generator)
        return x_prev * (1 - keep) + known * keep

    x_t = noised(model, x0, float(sampler.timesteps[start]), generator)
    out = model.sample(len(x0), sampler=sampler, x_T=x_t, start_step=start, on_step=blend_known, progress=progress,
                       generator=generator, jump_length=jump_length, jump_n_sample=jump_n_sample, **sample_options)
    if not model.space.bounded:  # decoded latents: the known pixels from the input itself
        out = out * mask + images * (1 - mask)
    return out


@torch.no_grad()
def interpolate(model, frames: int, x_T: torch.Tensor, sampler: Callable[..., Sampler] | Sampler | None = None,
                captions: tuple[str, str] | None = None, progress: bool | None = None,
                **sample_options) -> torch.Tensor:
    """``frames`` images between two samples: the noises ``x_T[0]`` and ``x_T[1]`` interpolated spherically
    (:func:`diffexp.diffusion.slerp`) and, for text models given two ``captions``, their embeddings linearly
    (the conditioner's ``interpolated``), at w = 0, 1/(frames-1), ..., 1, each decoded by ``sampler``. With a
    deterministic sampler (DDIM, eta 0; DPM-Solver++(2M); UniPC) the first and last frames are the plain samples
    of the endpoints, and the row shows how smoothly the model maps its inputs to images. ``sample_options`` go
    to ``model.sample`` (guidance, conditions for all frames, precision)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2 (the two endpoints and what lies between), got {frames!r}")
    if x_T.ndim != 4 or len(x_T) != 2 or tuple(x_T.shape[1:]) != model.sample_shape:
        raise ValueError(f"x_T must hold the two endpoint noises, (2, {', '.join(map(str, model.sample_shape))}); "
                         f"got {tuple(x_T.shape)}")
    weights = torch.linspace(0, 1, frames)
    noises = slerp(x_T[0], x_T[1], weights.to(x_T.device))
    net_conditions = None
    if captions is not None:
        if isinstance(captions, str) or len(captions) != 2:
            raise ValueError(f"captions must be two prompts (from, to), got {captions!r}")
        net_conditions = model.conditioner.interpolated(tuple(captions), weights, model.device)
    return model.sample(frames, sampler=sampler, x_T=noises.to(model.device), progress=progress,
                        net_conditions=net_conditions, **sample_options)
