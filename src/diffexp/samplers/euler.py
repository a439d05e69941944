"""Euler, Heun and ancestral Euler steps of Karras et al. (2022, "Elucidating the Design Space of
Diffusion-Based Generative Models") on sigma_t = sqrt((1 - abar_t) / abar_t).

In the variables x / alpha_t (alpha_t = sqrt(abar_t)) the probability-flow ODE is
d(x / alpha) / d sigma = eps(x, sigma), so with D = x0 prediction and d = eps:

    Euler (Alg. 1 without the correction):  x'/alpha' = x/alpha + (sigma' - sigma) d  =  x0 + sigma' eps
    Heun (Alg. 1, 2nd order):               x'/alpha' = x/alpha + (sigma' - sigma) (d + d') / 2,
                                            d' = eps at the Euler point and sigma' (skipped when sigma' = 0)
    ancestral Euler (k-diffusion):          sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
                                            sigma_down = sqrt(sigma'^2 - sigma_up^2),
                                            x'/alpha' = x0 + sigma_down eps + sigma_up z

Euler is DDIM (eta = 0) in these variables: on the same timesteps the two agree. The samplers keep x in the
variance-preserving form every sampler uses (x_t = alpha_t x0 + sqrt(1 - abar_t) eps) and convert at each
step. A sigma between two training timesteps is evaluated at the real t given by log-sigma interpolation
(:func:`diffexp.schedules.timestep_at_sigma`), the net seeing that real t.
"""
from __future__ import annotations

import math

from diffexp.samplers.base import SpacedSampler, checked_eta, randn
from diffexp.schedules import alpha_bar_at


class EulerSampler(SpacedSampler):
    """Euler's method on the probability-flow ODE in sigma. Default spacing: karras (rho = 7)."""

    default_spacing = "karras"

    def __init__(self, schedule, steps: int = 20, timestep_spacing: str | None = None, **kwargs):
        super().__init__(schedule, steps=steps, timestep_spacing=timestep_spacing, **kwargs)

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        alpha_prev = denoiser.alpha_sigma(t_prev)[0]
        return alpha_prev * (x0 + denoiser.sigma(t_prev) * eps), x0


class HeunSampler(EulerSampler):
    """Heun's second-order method (Karras et al. 2022, Alg. 1 with S_churn = 0): two model evaluations per
    step, one on the last (to sigma = 0), so NFE = 2 * steps - 1."""

    evaluations_per_step = 2

    def __init__(self, schedule, steps: int = 20, timestep_spacing: str | None = None, **kwargs):
        super().__init__(schedule, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        if float(alpha_bar_at(self.alphas_cumprod, float(self.timesteps[0]))) == 0.0:
            raise ValueError("sampler=heun cannot start at infinite noise (zero terminal SNR with a spacing that "
                             "starts at t = T-1); use sampler.timestep_spacing=leading, or another sampler "
                             "(dpmpp_2m, unipc, euler, ddim) with trailing spacing")

    def nfe(self, start_step: int = 0, jump_length: int = 10, jump_n_sample: int = 1) -> int:
        return max(0, super().nfe(start_step, jump_length, jump_n_sample) - 1)  # the last step evaluates once

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        alpha, alpha_prev = denoiser.alpha_sigma(t)[0], denoiser.alpha_sigma(t_prev)[0]
        sigma, sigma_prev = denoiser.sigma(t), denoiser.sigma(t_prev)
        euler = alpha_prev * (x0 + sigma_prev * eps)
        if sigma_prev == 0:
            return euler, x0
        _, eps_prev = denoiser(euler, t_prev)
        return alpha_prev * (x_t / alpha + (sigma_prev - sigma) * 0.5 * (eps + eps_prev)), x0


class EulerAncestralSampler(EulerSampler):
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise of std sigma_up (eta = 1: as much noise
    as the forward process between the two levels; eta = 0: Euler)."""

    def __init__(self, schedule, steps: int = 20, eta: float = 1.0, timestep_spacing: str | None = None, **kwargs):
        super().__init__(schedule, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        self.eta = checked_eta(eta)

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        sigma, sigma_prev = denoiser.sigma(t), denoiser.sigma(t_prev)
        ratio = sigma_prev / sigma  # 0 when sigma = inf
        sigma_up = min(sigma_prev, self.eta * sigma_prev * math.sqrt(max(1.0 - ratio**2, 0.0)))
        sigma_down = math.sqrt(max(sigma_prev**2 - sigma_up**2, 0.0))
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        alpha_prev = denoiser.alpha_sigma(t_prev)[0]
        return alpha_prev * (x0 + sigma_down * eps + sigma_up * noise), x0
