"""Multistep consistency sampling (Song et al. 2023, Algorithm 1), on any Gaussian path."""
from __future__ import annotations

import math

import torch

from diffexp.samplers.base import SpacedSampler, randn


class ConsistencySampler(SpacedSampler):
    """A consistency model's few-step sampler: x_0 = f(x_T, t_max) in one evaluation, then for each further noise
    level t_n: x = alpha_n x_0 + sigma_n z with fresh z ~ N(0, I) (the forward process from the current x_0), and
    x_0 = f(x, t_n). ``steps`` evaluations in all; every step but the first draws noise from the generator.

    The levels after the first are the spacing's times (default: the path's; trailing on the flow path gives
    t = 1, 1/2 for two steps), or ``sigmas``: Karras sigmas sigma = sigma_t / alpha_t for the steps after the first
    (``steps`` - 1 of them, descending; ECT's two-step CIFAR-10 sampler uses sigma = 0.821). Default spacing: the
    path's, else trailing (the first evaluation at the noisiest time, the rest evenly below it).

    With the exact consistency function (the probability-flow ODE's map to the clean time) every number of steps
    samples the data law exactly; with a denoiser in its place each step gives a posterior mean.
    """

    steps_from_pair = True

    default_spacing = "trailing"

    def __init__(self, path, steps: int = 2, timestep_spacing: str | None = None, sigmas: list | None = None,
                 **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        if sigmas is not None and (isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__")):
            raise ValueError(f"sampler.sigmas must be a list of {steps - 1} noise levels (e.g. sampler.sigmas=[1.5]) or "
                             f"null, got {sigmas!r}")
        try:
            self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        except (TypeError, ValueError):
            raise ValueError(f"sampler.sigmas must hold numbers, got {list(sigmas)!r}") from None
        if self.sigmas is not None:
            if len(self.sigmas) != steps - 1:
                raise ValueError(f"sampler.sigmas gives the noise levels after the first step: {steps - 1} of them for "
                                 f"sampler.steps={steps}, got {len(self.sigmas)}")
            if any(not math.isfinite(s) or s <= 0 for s in self.sigmas) or \
                    any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:])):
                raise ValueError(f"sampler.sigmas must be positive, finite and strictly descending, got {self.sigmas}")
            later = self.path.time_at_ve_sigma(torch.tensor(self.sigmas, dtype=torch.float64), clamp=True)
            self._timesteps = torch.cat([self._timesteps[:1].double(), later])
            if not bool((self._timesteps[1:] < self._timesteps[:-1]).all()):
                raise ValueError(f"sampler.sigmas={self.sigmas} must lie below the first level's sigma "
                                 f"({self.path.ve_sigma(float(self._timesteps[0])):.4g})")

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, _ = denoiser(x_t, t)
        if denoiser.is_clean(t_prev):
            return x0, x0
        alpha_prev, sigma_prev = denoiser.alpha_sigma(t_prev)
        return alpha_prev * x0 + sigma_prev * randn(x_t.shape, generator, x_t.device, x_t.dtype), x0
