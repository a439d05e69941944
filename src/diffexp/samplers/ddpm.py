"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2)."""
from __future__ import annotations

from diffexp.samplers.base import SpacedSampler, randn

VARIANCE_TYPES = ("fixed_small", "fixed_large")


class DDPMSampler(SpacedSampler):
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x_0) with x_0 predicted by the model.

    For consecutive visited timesteps t > t' (t' = t - 1 when ``steps`` is None, all T steps):
        alpha = abar_t / abar_t',  beta = 1 - alpha
        mean  = sqrt(abar_t') beta / (1 - abar_t) * x_0 + sqrt(alpha) (1 - abar_t') / (1 - abar_t) * x_t
        var   = (1 - abar_t') / (1 - abar_t) * beta   (``fixed_small``, posterior beta-tilde)
              = beta                                  (``fixed_large``)
    No noise is added on the last step (to t' = -1, where abar = 1).
    """

    def __init__(self, schedule, steps: int | None = None, variance_type: str = "fixed_small",
                 timestep_spacing: str = "leading", **kwargs):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"sampler.variance_type={variance_type!r}; choose one of {list(VARIANCE_TYPES)}")
        super().__init__(schedule, steps=steps if steps is not None else schedule.num_timesteps,
                         timestep_spacing=timestep_spacing, **kwargs)
        self.variance_type = variance_type

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, _ = denoiser(x_t, t)
        abar_t, abar_prev = denoiser.alpha_bar(t), denoiser.alpha_bar(t_prev)
        alpha = abar_t / abar_prev
        beta = 1.0 - alpha
        mean = (abar_prev**0.5 * beta / (1 - abar_t)) * x0 + (alpha**0.5 * (1 - abar_prev) / (1 - abar_t)) * x_t
        if t_prev < 0:
            return mean, x0
        var = (1 - abar_prev) / (1 - abar_t) * beta if self.variance_type == "fixed_small" else beta
        return mean + var**0.5 * randn(x_t.shape, generator, x_t.device, x_t.dtype), x0
