"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on any Gaussian path."""
from __future__ import annotations

from diffexp.samplers.base import SpacedSampler, randn

VARIANCE_TYPES = ("fixed_small", "fixed_large")
CONTINUOUS_STEPS = 1000  # steps=None on a continuous path (a discrete one runs all its T steps)


class DDPMSampler(SpacedSampler):
    """Ancestral sampling from the posterior q(x_t' | x_t, x_0) with x_0 predicted by the model.

    For consecutive visited times t > t' (t' = t - 1 when ``steps`` is None on a discrete path: all T steps), with
    q(x_t | x_t') = N(a x_t', v I) the path's forward transition (a = alpha_t / alpha_t', v = sigma_t^2 - a^2 sigma_t'^2):
        mean  = alpha_t' v / sigma_t^2 * x_0 + a sigma_t'^2 / sigma_t^2 * x_t
        var   = sigma_t'^2 / sigma_t^2 * v     (``fixed_small``, the posterior's; DDPM's beta-tilde)
              = v                            (``fixed_large``; DDPM's beta)
    On a DDPM path v = beta = 1 - abar_t / abar_t' and these are Ho et al.'s eqs. 6-7. No noise is added on the last
    step (to the clean time).
    """

    def __init__(self, path, steps: int | None = None, variance_type: str = "fixed_small",
                 timestep_spacing: str | None = None, **kwargs):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"sampler.variance_type={variance_type!r}; choose one of {list(VARIANCE_TYPES)}")
        from diffexp.paths import as_path

        path = as_path(path)
        if steps is None:
            steps = path.num_timesteps or CONTINUOUS_STEPS
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        self.variance_type = variance_type

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, _ = denoiser(x_t, t)
        alpha_prev = denoiser.alpha_sigma(t_prev)[0]
        var_t, var_prev = denoiser.variance(t), denoiser.variance(t_prev)
        a, v = denoiser.transition(t_prev, t)
        mean = (alpha_prev * v / var_t) * x0 + (a * var_prev / var_t) * x_t
        if denoiser.is_clean(t_prev):
            return mean, x0
        var = var_prev / var_t * v if self.variance_type == "fixed_small" else v
        return mean + var**0.5 * randn(x_t.shape, generator, x_t.device, x_t.dtype), x0
