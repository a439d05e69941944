"""Which timesteps a sampler with fewer steps than the schedule visits."""
from __future__ import annotations

import torch

from diffexp.schedules import karras_sigmas, sigmas_of, timestep_at_sigma

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "karras")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading",
                     alphas_cumprod: torch.Tensor | None = None, rho: float = 7.0) -> torch.Tensor:
    """Descending timesteps (length ``steps``) in [0, T).

    - leading:  arange(steps) * (T // steps), reversed      (DDIM paper; diffusers "leading")
    - trailing: round(arange(T, 0, -T/steps)) - 1           (Lin et al. 2023; starts at T-1)
    - linspace: round(linspace(0, T-1, steps)), reversed
    - karras:   the real timesteps of Karras et al. (2022)'s sigmas from sigma_{T-1} down to sigma_0, equally
                spaced in sigma^(1/rho) (:func:`diffexp.schedules.karras_sigmas`), mapped to t by log-sigma
                interpolation (:func:`diffexp.schedules.timestep_at_sigma`); floats, needs ``alphas_cumprod``.
    The first three give integers (LongTensor); Table 2 of Lin et al. 2023 compares them.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"sampler.steps must be a positive integer, got {steps!r}")
    if steps > num_timesteps:
        raise ValueError(f"sampler.steps={steps} exceeds the schedule's num_timesteps={num_timesteps}")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)
    elif spacing == "trailing":  # T - i T/steps for i < steps (arange's float end could add a step)
        ts = torch.round(num_timesteps - torch.arange(steps, dtype=torch.float64) * (num_timesteps / steps)).flip(0) - 1
    elif spacing == "linspace":
        ts = torch.round(torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64))
    elif spacing == "karras":
        if alphas_cumprod is None:
            raise ValueError("timestep_spacing=karras needs the schedule's alphas_cumprod")
        sigmas = sigmas_of(alphas_cumprod)
        ts = timestep_at_sigma(alphas_cumprod, karras_sigmas(float(sigmas[0]), float(sigmas[-1]), steps, rho))
        ts[0] = num_timesteps - 1  # the ends exactly (no rounding drift)
        if steps > 1:
            ts[-1] = 0
        return ts
    else:
        raise ValueError(f"sampler.timestep_spacing={spacing!r}; choose one of {list(TIMESTEP_SPACINGS)}")
    return ts.long().flip(0)
