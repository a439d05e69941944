"""Which times a sampler with few steps visits, on any Gaussian path (:mod:`diffexp.paths`)."""
from __future__ import annotations

import math

import torch

from diffexp.paths import GaussianPath, flow_time, shift_flow_time
from diffexp.schedules import karras_sigmas

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "uniform", "karras", "shifted")
F64 = torch.float64


def spaced_timesteps(path: GaussianPath, steps: int, spacing: str = "leading", rho: float = 7.0,
                     shift: float = 3.0) -> torch.Tensor:
    """Descending times (length ``steps``) of ``path``, from its ``t_max`` towards its clean time.

    On a discrete path (T integer timesteps):
    - leading:  arange(steps) * (T // steps), reversed      (DDIM paper; diffusers "leading")
    - trailing: round(arange(T, 0, -T/steps)) - 1           (Lin et al. 2023; starts at T-1)
    - linspace: round(linspace(0, T-1, steps)), reversed
    (integers: LongTensor; Table 2 of Lin et al. 2023 compares them). On a continuous path the same ideas in real
    time: leading t_min + (t_max - t_min) k / steps for k = steps-1 .. 0; trailing t_max - k (t_max - t_clean) / steps
    for k = 0 .. steps-1 (the last step lands on the clean data); linspace = uniform.

    On every path:
    - uniform:  linspace(t_max, t_min, steps) in the path's time;
    - karras:   Karras et al. (2022, eq. 5)'s noise levels sigma = sigma_t / alpha_t from sigma(t_max) down to
                sigma(t_min), equally spaced in sigma^(1/rho) (:func:`diffexp.schedules.karras_sigmas`), mapped to
                times through the path (:meth:`~diffexp.paths.GaussianPath.time_at_ve_sigma`); needs a finite
                sigma(t_max);
    - shifted:  SD3's shifted uniform timesteps (Esser et al. 2024, eq. 23): flow times u = sigma / (alpha + sigma)
                uniform from u(t_max) to u(t_min), then u' = shift u / (1 + (shift - 1) u), i.e. log-SNR lowered by
                2 ln(shift), mapped to the path's times (on the flow path u' is t itself).
    Real-valued spacings give float64 times, ends exact.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"sampler.steps must be a positive integer, got {steps!r}")
    T = path.num_timesteps
    if T is not None and steps > T:
        raise ValueError(f"sampler.steps={steps} exceeds the schedule's num_timesteps={T}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"sampler.timestep_spacing={spacing!r}; choose one of {list(TIMESTEP_SPACINGS)}")
    if T is not None and spacing in ("leading", "trailing", "linspace"):
        if spacing == "leading":
            ts = torch.arange(steps, dtype=F64) * (T // steps)
        elif spacing == "trailing":  # T - i T/steps for i < steps (arange's float end could add a step)
            ts = torch.round(T - torch.arange(steps, dtype=F64) * (T / steps)).flip(0) - 1
        else:
            ts = torch.round(torch.linspace(0, T - 1, steps, dtype=F64))
        return ts.long().flip(0)
    t_min, t_max = path.t_min, path.t_max
    if spacing == "karras":
        sigma_min, sigma_max = path.ve_sigma_range()
        if not math.isfinite(sigma_max):
            raise ValueError(f"Karras sigma spacing needs a finite largest sigma, but this path starts at pure noise "
                             f"(alpha = 0 at t={t_max:g}: zero terminal SNR or a continuous path's end); use "
                             f"sampler.timestep_spacing=trailing or uniform (or set the path's t_max below it)")
        ts = path.time_at_ve_sigma(karras_sigmas(sigma_min, sigma_max, steps, rho))
        ts[0] = t_max  # the ends exactly (no rounding drift)
        if steps > 1:
            ts[-1] = t_min
        return ts
    if spacing in ("uniform", "linspace"):
        return torch.linspace(t_max, t_min, steps, dtype=F64)
    if spacing == "trailing":
        return t_max - torch.arange(steps, dtype=F64) * ((t_max - path.clean_time) / steps)
    if spacing == "leading":
        return t_min + (t_max - t_min) * torch.arange(steps - 1, -1, -1, dtype=F64) / steps
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"sampler.shift must be a positive number (SD3's timestep shift), got {shift!r}")
    u = shift_flow_time(torch.linspace(flow_time(path, t_max), flow_time(path, t_min), steps, dtype=F64), shift)
    ts = path.time_at_log_snr(2.0 * ((1 - u).log() - u.log()), clamp=True)
    if u[0] == 1.0:
        ts[0] = t_max  # pure noise maps back to the start exactly
    return ts
