"""Noise schedules: betas -> alphas_cumprod and SNR (pure torch, float64).

A schedule fixes the forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
for integer timesteps t in [0, T), with abar_t = prod_{s<=t} (1 - beta_s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffexp.registry import register_part

BetasFn = Callable[..., torch.Tensor]  # betas(T, beta_start=, beta_end=, cosine_s=, max_beta=) -> float64 (T,)
SCHEDULES: dict[str, BetasFn] = {}


def register_schedule(name: str):
    """Decorator: make ``betas(T, beta_start, beta_end, cosine_s, max_beta) -> (T,) float64`` available as
    ``get_schedule(name)`` (and so as ``schedule=<name>`` with a YAML naming it)."""

    def add(fn: BetasFn) -> BetasFn:
        SCHEDULES[name] = fn
        return fn

    return add


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete noise schedule; every tensor is float64 of shape (T,)."""

    name: str
    betas: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas(self) -> torch.Tensor:
        """alpha_t = 1 - beta_t."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t = prod_{s<=t} alpha_s."""
        return torch.cumprod(self.alphas, dim=0)

    @property
    def snr(self) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t)."""
        abar = self.alphas_cumprod
        return abar / (1.0 - abar)

    @property
    def log_snr(self) -> torch.Tensor:
        """log SNR(t) (-inf where the terminal SNR is zero)."""
        return torch.log(self.snr)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, T={self.num_timesteps})"


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """f(u) = cos(((u + s) / (1 + s)) * pi / 2) ** 2 (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_{T-1} = 0 and abar_0 is kept (Lin et al. 2023, Alg. 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@register_schedule("linear")
def linear_betas(T: int, beta_start: float, beta_end: float, **_) -> torch.Tensor:
    """betas = linspace(beta_start, beta_end, T) (Ho et al. 2020; no 1000/T rescaling)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


@register_schedule("quadratic")
def quadratic_betas(T: int, beta_start: float, beta_end: float, **_) -> torch.Tensor:
    """betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


@register_schedule("cosine")
def cosine_betas(T: int, cosine_s: float = 0.008, max_beta: float = 0.999, **_) -> torch.Tensor:
    """betas[i] = min(1 - f((i+1)/T) / f(i/T), max_beta), f = :func:`cosine_alpha_bar` (Nichol & Dhariwal 2021)."""
    f = cosine_alpha_bar(torch.arange(T + 1, dtype=torch.float64) / T, cosine_s)
    return torch.clamp(1.0 - f[1:] / f[:-1], max=max_beta)


@register_schedule("sigmoid")
def sigmoid_betas(T: int, beta_start: float, beta_end: float, **_) -> torch.Tensor:
    """betas = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


@register_part
def get_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
    rescale_zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """The registered schedule ``name`` (:data:`SCHEDULES`: linear, quadratic, cosine, sigmoid, ...) with
    T = num_timesteps steps; ``rescale_zero_terminal_snr`` then applies Lin et al. (2023), Alg. 1."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r} is not a known schedule; choose one of {list(SCHEDULES)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"schedule.num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"schedule needs 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = SCHEDULES[name](num_timesteps, beta_start=beta_start, beta_end=beta_end, cosine_s=cosine_s,
                            max_beta=max_beta)
    if rescale_zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    return NoiseSchedule(name=name + ("+ztsnr" if rescale_zero_terminal_snr else ""), betas=betas)


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """abar at a real timestep t in [0, T-1] by linear interpolation of log sigma between the integer
    timesteps around it, sigma = sqrt((1 - abar) / abar) (the interpolation k-diffusion uses to move
    between sigmas and discrete timesteps); at integer t it is abar_t itself."""
    t = torch.as_tensor(t, dtype=torch.float64)
    low = t.floor().long().clamp(0, len(alphas_cumprod) - 1)
    high = (low + 1).clamp(max=len(alphas_cumprod) - 1)
    w = t - low.double()
    log_sigma = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)
    sigma = torch.exp((1 - w) * log_sigma[low] + w * log_sigma[high])
    return torch.where(w == 0, alphas_cumprod[low], 1 / (1 + sigma**2))  # exact (and no 0 * inf) at integers


def sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), the noise level of x_t / sqrt(abar_t) (Karras et al. 2022's
    variables: x_t / sqrt(abar_t) = x_0 + sigma_t eps); inf where abar_t = 0."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def timestep_at_sigma(alphas_cumprod: torch.Tensor, sigma: float | torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """The real timestep t in [0, T-1] whose sigma is ``sigma``: the inverse of :func:`alpha_bar_at` (log sigma
    linear in t between the integer timesteps around it). A sigma outside the schedule's range (beyond rounding) is
    an error, or its nearest end with ``clamp``."""
    log_sigmas = sigmas_of(alphas_cumprod).log()
    finite = log_sigmas[torch.isfinite(log_sigmas)]
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
    if not clamp and ((log_sigma < finite[0] - 1e-9) | (log_sigma > finite[-1] + 1e-9)).any():
        raise ValueError(f"sigma {log_sigma.exp().min().item():.4g}..{log_sigma.exp().max().item():.4g} lies outside "
                         f"this {len(alphas_cumprod)}-step schedule's range [{finite[0].exp().item():.4g}, "
                         f"{finite[-1].exp().item():.4g}]; a discrete schedule is defined on its table only "
                         f"(path=edm reaches any sigma)")
    log_sigma = log_sigma.clamp(finite[0], finite[-1])
    high = torch.searchsorted(finite, log_sigma.reshape(-1)).clamp(1, len(finite) - 1).reshape(log_sigma.shape)
    low = high - 1
    w = (log_sigma - finite[low]) / (finite[high] - finite[low])
    return low.double() + w


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, equally spaced in sigma^(1/rho) (Karras et al. 2022,
    eq. 5; rho = 7 there): sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    if not math.isfinite(sigma_max):
        raise ValueError("Karras sigma spacing needs a finite largest sigma; this schedule has zero terminal SNR "
                         "(sigma = inf at t = T-1): use sampler.timestep_spacing=trailing")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    return karras_ramp(ramp, sigma_min, sigma_max, rho)


def karras_ramp(ramp, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """The noise level at position ``ramp`` in [0, 1] (a number or a tensor) of Karras et al.'s ramp from sigma_max
    (0) to sigma_min (1): (sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (their eq. 5)."""
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (high + ramp * (low - high)) ** rho
