"""Euler, Heun, ancestral Euler and EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Algorithms 1 and 2), on any Gaussian path.

In the variables x / alpha_t and sigma = sigma_t / alpha_t (Karras' sigma; t itself on EDM's path) the
probability-flow ODE is d(x / alpha) / d sigma = eps(x, sigma), so with D = the x0 prediction and d = eps:

    Euler (Alg. 1 without the correction):  x'/alpha' = x/alpha + (sigma' - sigma) d  =  x0 + sigma' eps
    Heun (Alg. 1, 2nd order):               x'/alpha' = x/alpha + (sigma' - sigma) (d + d') / 2,
                                            d' = eps at the Euler point and sigma' (skipped when sigma' = 0)
    EDM stochastic (Alg. 2):                first sigma_hat = sigma (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1)
                                            for sigma in [S_tmin, S_tmax] (else 0), x_hat/alpha_hat =
                                            x/alpha + sqrt(sigma_hat^2 - sigma^2) S_noise z; then the Heun step from
                                            sigma_hat
    ancestral Euler (k-diffusion):          sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
                                            sigma_down = sqrt(sigma'^2 - sigma_up^2),
                                            x'/alpha' = x0 + sigma_down eps + sigma_up z

Euler is DDIM (eta = 0) in these variables: on the same times the two agree. The samplers keep x in the path's
own form (x_t = alpha_t x0 + sigma_t eps) and convert at each step. From pure noise (alpha = 0, sigma = inf: a
zero-terminal-SNR schedule's or the flow path's t = 1) Heun's correction is undefined, so that first step is
Euler's and costs one evaluation.
"""
from __future__ import annotations

import math

from diffexp.samplers.base import SpacedSampler, checked_eta, randn


class EulerSampler(SpacedSampler):
    """Euler's method on the probability-flow ODE in sigma. Default spacing: karras (rho = 7)."""

    default_spacing = "karras"
    steps_from_pair = True

    def __init__(self, path, steps: int = 20, timestep_spacing: str | None = None, **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        alpha_prev = denoiser.alpha_sigma(t_prev)[0]
        return alpha_prev * (x0 + denoiser.ve_sigma(t_prev) * eps), x0


class HeunSampler(EulerSampler):
    """Heun's second-order method (Karras et al. 2022, Alg. 1; Alg. 2 with S_churn = 0): two model evaluations
    per step, one on the last (to sigma = 0) and on a first step from pure noise, so NFE = 2 * steps - 1."""

    steps_from_pair = False  # the corrector steps from x_t

    def churn(self, sigma: float) -> float:
        """gamma of Alg. 2 at noise level sigma: 0 (deterministic)."""
        return 0.0

    def step_evaluations(self, t, t_prev) -> int:
        return 1 if t_prev == self.path.clean_time or math.isinf(self.path.ve_sigma(t)) else 2

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        sigma = denoiser.ve_sigma(t)
        gamma = self.churn(sigma) if math.isfinite(sigma) else 0.0
        if gamma > 0:  # Alg. 2, lines 4-6: raise the noise level to sigma_hat, adding the noise that takes
            t_hat = float(self.path.time_at_ve_sigma(sigma * (1 + gamma), clamp=True))
            sigma_hat = denoiser.ve_sigma(t_hat)
            if sigma_hat > sigma:
                alpha, alpha_hat = denoiser.alpha_sigma(t)[0], denoiser.alpha_sigma(t_hat)[0]
                z = randn(x_t.shape, generator, x_t.device, x_t.dtype)
                x_t = alpha_hat * (x_t / alpha + (sigma_hat**2 - sigma**2) ** 0.5 * self.S_noise * z)
                t, sigma = t_hat, sigma_hat
        x0, eps = denoiser(x_t, t)
        alpha_prev, sigma_prev = denoiser.alpha_sigma(t_prev)[0], denoiser.ve_sigma(t_prev)
        euler = alpha_prev * (x0 + sigma_prev * eps)
        if sigma_prev == 0 or math.isinf(sigma):
            return euler, x0
        alpha = denoiser.alpha_sigma(t)[0]
        _, eps_prev = denoiser(euler, t_prev)
        return alpha_prev * (x_t / alpha + (sigma_prev - sigma) * 0.5 * (eps + eps_prev)), x0


class EDMSampler(HeunSampler):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): Heun steps after "churn" that raises sigma by
    gamma = min(S_churn / N, sqrt(2) - 1) within [S_tmin, S_tmax], adding noise of std S_noise for the raise.
    S_churn = 0 is Heun (Alg. 1); EDM's defaults: 18 steps (35 evaluations), Karras spacing, rho = 7. The raised
    sigma stays within the path (a discrete table's largest sigma)."""

    def __init__(self, path, steps: int = 18, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
                 S_noise: float = 1.0, timestep_spacing: str | None = None, **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        for name, value in (("S_churn", S_churn), ("S_tmin", S_tmin), ("S_tmax", S_tmax), ("S_noise", S_noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise ValueError(f"sampler.{name} must be a number >= 0, got {value!r}")
        if S_tmin > S_tmax:
            raise ValueError(f"sampler.S_tmin={S_tmin} exceeds sampler.S_tmax={S_tmax}")
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = float(S_churn), float(S_tmin), float(S_tmax), float(S_noise)

    def churn(self, sigma):
        if self.S_churn == 0 or not self.S_tmin <= sigma <= self.S_tmax:
            return 0.0
        return min(self.S_churn / len(self.timesteps), 2**0.5 - 1)


class EulerAncestralSampler(EulerSampler):
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise of std sigma_up (eta = 1: as much noise
    as the forward process between the two levels; eta = 0: Euler)."""

    def __init__(self, path, steps: int = 20, eta: float = 1.0, timestep_spacing: str | None = None, **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        self.eta = checked_eta(eta)

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        sigma, sigma_prev = denoiser.ve_sigma(t), denoiser.ve_sigma(t_prev)
        ratio = sigma_prev / sigma  # 0 when sigma = inf
        sigma_up = min(sigma_prev, self.eta * sigma_prev * math.sqrt(max(1.0 - ratio**2, 0.0)))
        sigma_down = math.sqrt(max(sigma_prev**2 - sigma_up**2, 0.0))
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        alpha_prev = denoiser.alpha_sigma(t_prev)[0]
        return alpha_prev * (x0 + sigma_down * eps + sigma_up * noise), x0
