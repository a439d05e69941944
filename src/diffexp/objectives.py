"""The training objective as one object: a time density, a loss weighting and the prediction's target (pure torch).

    L = E_{t ~ p(t), x_0, eps} [ w(t) || F(x_t, t) - target(x_0, eps, t) ||^2 ],   x_t = alpha_t x_0 + sigma_t eps,

the squared error averaged over each item's elements, then over the batch (:class:`Objective`).

Densities p(t) (``density=``):
- ``uniform_timesteps``: t ~ U{0, ..., T-1}, DDPM's (a discrete path only);
- ``uniform``: t ~ U[t_min, t_max] of the path;
- ``logit_normal(m, s, shift)``: SD3's (Esser et al. 2024, eq. 19): flow time u = sigmoid(m + s n), n ~ N(0, 1),
  optionally shifted (eq. 23);
- ``log_normal(mean, std)``: EDM's ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1: -1.2, 1.2).
The last two are normal in log-SNR, lambda = -2 (m + s n) - 2 ln(shift) and lambda = -2 (P_mean + P_std n), so each
reaches every path through its inverse log-SNR (:meth:`diffexp.paths.GaussianPath.time_at_log_snr`).

Weightings w (``weighting=``), each stated for the error it was defined on and converted to the prediction's own
error by :meth:`diffexp.diffusion.Prediction.error_scale` c (||raw error||^2 = c ||x_0 error||^2):
- ``none``: w = 1 on the prediction's own error;
- ``min_snr(gamma)``: min(SNR, gamma) on the x_0 error (Hang et al. 2023): min(SNR, g) / SNR for epsilon,
  min(SNR, g) / (SNR + 1) for v on VP paths, min(SNR, g) for x_0;
- ``edm``: EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x_0 error (sigma = sigma_t / alpha_t),
  1 exactly on EDM's preconditioned F;
- ``sigmoid(bias)``: sigmoid(bias - lambda) on the eps error (Kingma & Gao 2023, "Understanding Diffusion
  Objectives", their sigmoid weighting).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from diffexp.diffusion import Prediction
from diffexp.paths import GaussianPath
from diffexp.registry import Registry

DENSITIES = Registry("time density")
WEIGHTINGS = Registry("loss weighting")


def check_positive(option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{option} must be a positive number, got {value!r}")
    return float(value)


def check_finite(option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{option} must be a number, got {value!r}")
    return float(value)


# --- densities -----------------------------------------------------------------------------------------------
class Density:
    """p(t): :meth:`sample` draws one training time per item."""

    def check_path(self, path: GaussianPath) -> None:
        """A clear error if this density cannot draw times of ``path``."""

    def sample(self, n: int, path: GaussianPath, generator: torch.Generator | None, device) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


@DENSITIES.register("uniform_timesteps")
class UniformTimesteps(Density):
    """t ~ U{0, ..., T-1}: DDPM's integer timesteps (Ho et al. 2020, Alg. 1)."""

    def check_path(self, path):
        if path.num_timesteps is None:
            raise ValueError(f"density=uniform_timesteps draws a discrete path's integer timesteps, but the path is "
                             f"continuous ({type(path).__name__}); use density=uniform|logit_normal|log_normal")

    def sample(self, n, path, generator, device):
        return torch.randint(0, path.num_timesteps, (n,), device=device, generator=generator)


@DENSITIES.register("uniform")
class Uniform(Density):
    """t ~ U[t_min, t_max] of the path (real times; on a discrete path, real timesteps)."""

    def sample(self, n, path, generator, device):
        u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
        return path.t_min + (path.t_max - path.t_min) * u


class LogSNRNormal(Density):
    """Densities that are normal in log-SNR: lambda = loc + scale n, n ~ N(0, 1), mapped to the path's times."""

    def log_snr(self, n: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n, path, generator, device):
        normal = torch.randn(n, device=device, generator=generator, dtype=torch.float64)
        return path.time_at_log_snr(self.log_snr(normal), clamp=True)


@DENSITIES.register("logit_normal")
class LogitNormal(LogSNRNormal):
    """SD3's logit-normal: flow time u = sigmoid(m + s n), then SD3's shift u' = shift u / (1 + (shift - 1) u);
    in log-SNR lambda = -2 (m + s n) - 2 ln(shift) (Esser et al. 2024: m = 0, s = 1)."""

    def __init__(self, m: float = 0.0, s: float = 1.0, shift: float = 1.0):
        self.m, self.s = check_finite("density.m", m), check_positive("density.s", s)
        self.shift = check_positive("density.shift", shift)

    def log_snr(self, n):
        return -2.0 * (self.m + self.s * n) - 2.0 * math.log(self.shift)

    def __repr__(self):
        return f"LogitNormal(m={self.m:g}, s={self.s:g}, shift={self.shift:g})"


@DENSITIES.register("log_normal")
class LogNormal(LogSNRNormal):
    """EDM's ln sigma ~ N(mean, std^2) for sigma = sigma_t / alpha_t (Karras et al. 2022: P_mean = -1.2,
    P_std = 1.2); lambda = -2 ln sigma."""

    def __init__(self, mean: float = -1.2, std: float = 1.2):
        self.mean, self.std = check_finite("density.mean", mean), check_positive("density.std", std)

    def log_snr(self, n):
        return -2.0 * (self.mean + self.std * n)

    def __repr__(self):
        return f"LogNormal(mean={self.mean:g}, std={self.std:g})"


# --- weightings ----------------------------------------------------------------------------------------------
class Weighting:
    """w(t) of each item's squared error of the prediction's raw output."""

    def __call__(self, snr: torch.Tensor, log_snr: Callable[[], torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        """Weights from the items' SNR, their log-SNR (computed on demand) and the prediction's error scale c."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


@WEIGHTINGS.register("none")
class NoWeighting(Weighting):
    """w = 1: the plain mean squared error of the prediction."""

    def __call__(self, snr, log_snr, scale):
        return torch.ones_like(snr)


@WEIGHTINGS.register("min_snr")
class MinSNR(Weighting):
    """min(SNR, gamma) on the x_0 error (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"),
    divided by the prediction's error scale; where that scale is 0 (epsilon at SNR = 0) its limit 1."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = check_positive("weighting.gamma", gamma)

    def __call__(self, snr, log_snr, scale):
        clipped = torch.clamp(snr, max=self.gamma)
        return torch.where(scale > 0, clipped / scale.clamp(min=torch.finfo(scale.dtype).tiny), torch.ones_like(snr))

    def __repr__(self):
        return f"MinSNR(gamma={self.gamma:g})"


@WEIGHTINGS.register("edm")
class EDMWeighting(Weighting):
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / sd^2 + SNR on the x_0 error (Karras et al. 2022,
    eq. 8 and Table 1), divided by the prediction's error scale (1 on EDM's preconditioned F)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = check_positive("weighting.sigma_data", sigma_data)

    def __call__(self, snr, log_snr, scale):
        return (1.0 / self.sigma_data**2 + snr) / scale

    def __repr__(self):
        return f"EDMWeighting(sigma_data={self.sigma_data:g})"


@WEIGHTINGS.register("sigmoid")
class SigmoidWeighting(Weighting):
    """sigmoid(bias - lambda) on the eps error (Kingma & Gao 2023, Sec. 5: a monotone weighting, so the loss is an
    ELBO of noise-augmented data); the eps error is SNR times the x_0 error, so on the prediction's error it is
    sigmoid(bias - lambda) SNR / c."""

    def __init__(self, bias: float = 0.0):
        self.bias = check_finite("weighting.bias", bias)

    def __call__(self, snr, log_snr, scale):
        return torch.sigmoid(self.bias - log_snr()) * snr / scale

    def __repr__(self):
        return f"SigmoidWeighting(bias={self.bias:g})"


# --- the objective -------------------------------------------------------------------------------------------
class Objective:
    """A Gaussian path, a prediction, a time density and a loss weighting: :meth:`loss` of a batch.

    Args:
        path: the :class:`~diffexp.paths.GaussianPath`.
        prediction: the :class:`~diffexp.diffusion.Prediction` the net's raw output stands for.
        density: p(t) (default: DDPM's integer timesteps on a discrete path, uniform times on a continuous one).
        weighting: w(t) (default: none).
    """

    def __init__(self, path: GaussianPath, prediction: Prediction, density: Density | None = None,
                 weighting: Weighting | None = None):
        self.path, self.prediction = path, prediction
        self.density = density or (UniformTimesteps() if path.num_timesteps is not None else Uniform())
        self.density.check_path(path)
        self.weighting = None if isinstance(weighting, NoWeighting) else weighting

    def weights(self, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """w(t) of each item (1 without a weighting)."""
        snr = self.path.snr(t)
        if self.weighting is None:
            return torch.ones_like(snr)
        flat = alpha.flatten() if alpha.ndim else alpha, sigma.flatten() if sigma.ndim else sigma
        scale = self.prediction.error_scale(snr, *flat, self.path.variance_preserving)
        return self.weighting(snr, lambda: self.path.log_snr(t), scale)

    def loss(self, net_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The objective on a batch of x_0: t from the density, then eps ~ N(0, I) (both from ``generator``; ``noise``
        given: eps coupled to x_0, as reflow's pairs), ``net_fn(net input, noise input)`` -> the raw output
        (conditions bound; it may draw from ``generator`` too)."""
        t = self.density.sample(x0.shape[0], self.path, generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.path.noised(x0, t, noise)
        alpha, sigma = self.path.coefficients(t, x0)
        target = self.prediction.target(x0, noise, x_t, alpha, sigma)
        raw = net_fn(self.prediction.net_input(x_t, alpha, sigma), self.path.noise_input(t))
        per_item = F.mse_loss(raw.float(), target.float(), reduction="none").flatten(1).mean(1)
        if self.weighting is not None:
            per_item = per_item * self.weights(t, alpha, sigma).float()
        return per_item.mean()

    def __repr__(self) -> str:
        return (f"Objective(path={self.path!r}, prediction={self.prediction!r}, density={self.density!r}, "
                f"weighting={self.weighting or NoWeighting()!r})")
