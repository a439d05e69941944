"""DDIM sampling (Song, Meng & Ermon 2021, eq. 12), on any Gaussian path."""
from __future__ import annotations

from diffexp.samplers.base import SpacedSampler, checked_eta, randn


class DDIMSampler(SpacedSampler):
    """Deterministic (eta = 0) to DDPM-like (eta = 1) sampling on ``steps`` spaced times.

    For consecutive visited times t > t' (t' the next time in the list; the clean time after the last), with
    q(x_t | x_t') = N(a x_t', v I) the path's forward transition (a = alpha_t / alpha_t', v = sigma_t^2 - a^2 sigma_t'^2):
        s      = eta * sqrt(sigma_t'^2 / sigma_t^2 * v)      (the posterior's std, scaled by eta)
        x_t'   = alpha_t' x_0 + sqrt(sigma_t'^2 - s^2) eps + s z
    On a DDPM path v = 1 - abar_t / abar_t' and this is eq. 12 with sigma_t(eta). With eta = 0 it is Euler's method
    on the probability-flow ODE in Karras et al.'s variables (x / alpha against sigma / alpha):
    :class:`~diffexp.samplers.euler.EulerSampler` on the same times.
    """

    steps_from_pair = True

    def __init__(self, path, steps: int = 50, eta: float = 0.0, timestep_spacing: str | None = None, **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        self.eta = checked_eta(eta)

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        alpha_prev, sigma_prev = denoiser.alpha_sigma(t_prev)
        var_t, var_prev = denoiser.variance(t), denoiser.variance(t_prev)
        sigma = self.eta * (var_prev / var_t * denoiser.transition(t_prev, t)[1]) ** 0.5 if self.eta > 0 else 0.0
        noise_scale = max(var_prev - sigma**2, 0.0) ** 0.5 if sigma > 0 else sigma_prev
        x_prev = alpha_prev * x0 + noise_scale * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_prev, x0
