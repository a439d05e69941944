"""DDIM sampling (Song, Meng & Ermon 2021, eq. 12)."""
from __future__ import annotations

from diffexp.samplers.base import SpacedSampler, checked_eta, randn


class DDIMSampler(SpacedSampler):
    """Deterministic (eta = 0) to DDPM-like (eta = 1) sampling on ``steps`` spaced timesteps.

    For consecutive visited timesteps t > t' (t' taken from the timestep list, abar_{-1} = 1):
        sigma  = eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')
        x_t'   = sqrt(abar_t') x_0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z
    With eta = 0 this is Euler's method on the probability-flow ODE in Karras et al.'s variables
    (x / sqrt(abar) against sigma): :class:`~diffexp.samplers.euler.EulerSampler` on the same timesteps.
    """

    def __init__(self, schedule, steps: int = 50, eta: float = 0.0, timestep_spacing: str = "leading", **kwargs):
        super().__init__(schedule, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        self.eta = checked_eta(eta)

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, eps = denoiser(x_t, t)
        abar_t, abar_prev = denoiser.alpha_bar(t), denoiser.alpha_bar(t_prev)
        sigma = self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_prev, x0
