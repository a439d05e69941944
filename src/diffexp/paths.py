"""Gaussian paths: the forward process x_t = alpha(t) x_0 + sigma(t) eps, eps ~ N(0, I), as one interface (pure torch).

A path fixes how data turn into noise along its own time variable t. Training objectives, samplers and editing
speak only alpha, sigma and the log-SNR lambda(t) = log(alpha(t)^2 / sigma(t)^2), which is monotone in t, so
DDPM, EDM and flow matching are points of one design space (Kingma et al. 2021, "Variational Diffusion Models";
Karras et al. 2022, Table 1):

- :class:`DiscretePath` (``path=ddpm``): DDPM's schedules (:mod:`diffexp.schedules`), alpha_t = sqrt(abar_t),
  sigma_t = sqrt(1 - abar_t) at integer t in [0, T), between them by log-sigma interpolation; exact at its grid
  (the float64 table); clean data at t = -1.
- :class:`CosinePath` (``path=cosine``): VP in continuous t in [0, 1], alpha^2 = f(t) / f(0) with
  f(t) = cos^2((t + s) / (1 + s) pi / 2) (Nichol & Dhariwal 2021's cosine, in continuous time); clean at t = 0.
- :class:`EDMPath` (``path=edm``): variance exploding, alpha = 1, sigma = t in [sigma_min, sigma_max] (Karras et
  al. 2022: 0.002, 80); clean at t = 0.
- :class:`FlowPath` (``path=flow``): alpha = 1 - t, sigma = t, t in [0, 1] (rectified flow, Liu et al. 2023; the
  conditional OT path of flow matching, Lipman et al. 2023); clean at t = 0.

Samplers start at ``t_max`` (the noisiest time trained) and end at ``clean_time``; training densities draw within
[``t_min``, ``t_max``]. The net's time input is :meth:`GaussianPath.noise_input` of t (DDPM: t itself, so nets and
checkpoints of the discrete-time code are unchanged; EDM: 0.25 ln sigma; flow and cosine: 1000 t).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffexp.registry import Registry
from diffexp.schedules import NoiseSchedule, alpha_bar_at, karras_ramp, sigmas_of, timestep_at_sigma

PATHS = Registry("path")
F64 = torch.float64


def check_range(option: str, low, high, lower_bound: float = 0.0, upper_bound: float = math.inf) -> None:
    for name, value in (("t_min", low), ("t_max", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{option}.{name} must be a finite number, got {value!r}")
    if not lower_bound <= low < high <= upper_bound:
        raise ValueError(f"{option} needs {lower_bound:g} <= t_min < t_max <= {upper_bound:g}, got t_min={low}, "
                         f"t_max={high}")


class GaussianPath:
    """The interface every path implements: :meth:`_alpha_sigma` and :meth:`_time_at_log_snr` on float64 tensors;
    the rest derives from them (subclasses may override a derived quantity for exactness).

    Attributes: ``t_min``/``t_max`` (the trained range; samplers start at ``t_max``), ``clean_time`` (alpha = 1,
    sigma = 0: where sampling ends), ``variance_preserving`` (alpha^2 + sigma^2 = 1), ``num_timesteps`` (T of a
    discrete path, else None), ``default_spacing`` (the timestep spacing samplers use on this path when none is
    configured; None: each sampler's own).
    """

    name = "path"
    variance_preserving = False
    clean_time = 0.0
    num_timesteps: int | None = None
    default_spacing: str | None = None

    def __init__(self, t_min: float, t_max: float):
        self.t_min, self.t_max = float(t_min), float(t_max)

    # --- what a path defines -----------------------------------------------------------------------------
    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) of float64 t (the clean time handled by the caller)."""
        raise NotImplementedError

    def _time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The time whose log-SNR is ``lam`` (float64; +inf -> the clean time)."""
        raise NotImplementedError

    def noise_input(self, t: torch.Tensor) -> torch.Tensor:
        """The net's noise-conditioning input at times ``t`` (what the time embedding receives)."""
        raise NotImplementedError

    # --- scalars (samplers) --------------------------------------------------------------------------------
    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t): x_t = alpha_t x_0 + sigma_t eps; (1, 0) at the clean time."""
        if t == self.clean_time:
            return 1.0, 0.0
        alpha, sigma = self._alpha_sigma(torch.tensor(float(t), dtype=F64))
        return alpha.item(), sigma.item()

    def conversion_alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) as the prediction conversions use them (:func:`diffexp.diffusion.to_x0_eps`)."""
        return self.alpha_sigma(t)

    def variance(self, t: float) -> float:
        """sigma_t^2."""
        return self.alpha_sigma(t)[1] ** 2

    def transition(self, s: float, t: float) -> tuple[float, float]:
        """(a, v) of the forward transition q(x_t | x_s) = N(a x_s, v I) from s to a noisier t:
        a = alpha_t / alpha_s, v = sigma_t^2 - a^2 sigma_s^2 (Kingma et al. 2021, eq. 3)."""
        (alpha_s, sigma_s), (alpha_t, sigma_t) = self.alpha_sigma(s), self.alpha_sigma(t)
        a = alpha_t / alpha_s
        return a, max(sigma_t**2 - a**2 * sigma_s**2, 0.0)

    def half_log_snr(self, t: float) -> float:
        """lambda_t / 2 = log(alpha_t / sigma_t) (DPM-Solver's lambda): +inf at the clean time, -inf where alpha = 0."""
        alpha, sigma = self.alpha_sigma(t)
        if sigma == 0:
            return math.inf
        return -math.inf if alpha == 0 else math.log(alpha / sigma)

    def ve_sigma(self, t: float) -> float:
        """Karras et al.'s sigma = sigma_t / alpha_t, the noise level of x_t / alpha_t = x_0 + sigma eps (0 at the
        clean time, inf where alpha = 0)."""
        alpha, sigma = self.alpha_sigma(t)
        return math.inf if alpha == 0 else sigma / alpha

    def ve_sigma_range(self) -> tuple[float, float]:
        """(sigma(t_min), sigma(t_max)) in Karras' sigma = sigma_t / alpha_t (Karras spacing's ends)."""
        return self.ve_sigma(self.t_min), self.ve_sigma(self.t_max)

    def prior_std(self, t: float) -> float:
        """The std of the noise a sampler starting at ``t`` begins from: sigma_t (EDM's x ~ N(0, sigma_max^2 I));
        1 on variance-preserving paths (DDPM's x_T ~ N(0, I))."""
        return 1.0 if self.variance_preserving else self.alpha_sigma(t)[1]

    def grid_time(self, fraction: float) -> float:
        """The time a fraction of the way from t_min (0) to t_max (1)."""
        return self.t_min + fraction * (self.t_max - self.t_min)

    # --- tensors (training, editing) -----------------------------------------------------------------------
    def _as_time(self, t) -> torch.Tensor:
        return as_time_tensor(t).double()

    def coefficients(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at times ``t`` ((N,) or a scalar) in ``like``'s dtype and device, shaped to broadcast over
        a batch like ``like`` (N, 1, ..., 1)."""
        t64 = self._as_time(t).to(like.device)
        alpha, sigma = self._alpha_sigma(t64)
        clean = t64 == self.clean_time
        alpha, sigma = torch.where(clean, 1.0, alpha), torch.where(clean, 0.0, sigma)
        shape = (-1, *([1] * (like.ndim - 1))) if t64.ndim else ()
        return alpha.to(like.dtype).reshape(shape), sigma.to(like.dtype).reshape(shape)

    def noised(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """A draw of q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I): alpha_t x_0 + sigma_t noise (t per item, or one)."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def renoised(self, x_s: torch.Tensor, s: float, t: float, noise: torch.Tensor) -> torch.Tensor:
        """A draw of q(x_t | x_s), x at ``s`` taken to the noisier time ``t`` (:meth:`transition`)."""
        a, v = self.transition(s, t)
        return a * x_s + v**0.5 * noise

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) as float32 (+inf at the clean time)."""
        alpha, sigma = self._alpha_sigma(self._as_time(t))
        return (2 * (alpha.log() - sigma.log())).float()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha^2 / sigma^2 as float32, on ``t``'s device."""
        alpha, sigma = self._alpha_sigma(self._as_time(t))
        return ((alpha / sigma) ** 2).float()

    def time_at_log_snr(self, lam, clamp: bool = False) -> torch.Tensor:
        """The times whose log-SNR is ``lam`` (float64). Outside [t_min, t_max] with ``clamp`` the nearest end."""
        t = self._time_at_log_snr(torch.as_tensor(lam, dtype=F64))
        return t.clamp(self.t_min, self.t_max) if clamp else t

    def time_at_ve_sigma(self, sigma, clamp: bool = False) -> torch.Tensor:
        """The times whose Karras sigma (:meth:`ve_sigma`) is ``sigma`` (float64 tensor in, same shape out)."""
        return self.time_at_log_snr(-2.0 * torch.as_tensor(sigma, dtype=F64).log(), clamp)

    def time_tensor(self, t: float, n: int, device) -> torch.Tensor:
        """``n`` copies of time ``t`` as the tensor a model function receives (float32)."""
        return torch.full((n,), float(t), dtype=torch.float32, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t in [{self.t_min:g}, {self.t_max:g}])"


@PATHS.register("ddpm")
class DiscretePath(GaussianPath):
    """DDPM's discrete variance-preserving path of a :class:`~diffexp.schedules.NoiseSchedule` (``path=ddpm`` with
    ``schedule=linear|quadratic|cosine|sigmoid``): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) at integer
    t in [0, T) exactly as the table gives them, at a real t by log-sigma interpolation
    (:func:`~diffexp.schedules.alpha_bar_at`); abar_{-1} = 1 is the clean data. The net gets t itself."""

    variance_preserving = True
    clean_time = -1.0

    def __init__(self, schedule: NoiseSchedule):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"path=ddpm needs a noise schedule (schedule=linear|quadratic|cosine|sigmoid), got "
                             f"{type(schedule).__name__}")
        self.schedule = schedule
        self.alphas_cumprod = schedule.alphas_cumprod  # float64
        self.num_timesteps = schedule.num_timesteps
        super().__init__(0.0, float(self.num_timesteps - 1))
        self.name = schedule.name
        self._tables: dict = {}

    def table(self, name: str, device) -> torch.Tensor:
        """``alphas_cumprod`` or ``snr`` as float32 on ``device``, copied once per device."""
        key = (name, str(device))
        if key not in self._tables:
            values = self.alphas_cumprod if name == "alphas_cumprod" else self.schedule.snr
            self._tables[key] = values.float().to(device)
        return self._tables[key]

    # scalars, as the discrete-time samplers computed them
    def alpha_bar(self, t: float) -> float:
        """abar_t, with abar_{-1} = 1 (the clean data before t = 0)."""
        if t < 0:
            return 1.0
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        return float(alpha_bar_at(self.alphas_cumprod, t))

    def alpha_sigma(self, t):
        abar = self.alpha_bar(t)
        return abar**0.5, (1 - abar) ** 0.5

    def conversion_alpha_sigma(self, t):
        # as the tensor code does it: abar rounded to float32, then sqrt(abar) and sqrt(1 - abar) in float32
        abar = np.float32(self.alpha_bar(t))
        return float(np.sqrt(abar)), float(np.sqrt(np.float32(1.0) - abar))

    def variance(self, t):
        return 1 - self.alpha_bar(t)

    def transition(self, s, t):
        ratio = self.alpha_bar(t) / self.alpha_bar(s)
        return ratio**0.5, 1 - ratio

    def half_log_snr(self, t):
        abar = self.alpha_bar(t)
        if abar >= 1:
            return math.inf
        if abar <= 0:
            return -math.inf
        return 0.5 * math.log(abar / (1 - abar))

    def ve_sigma(self, t):
        abar = self.alpha_bar(t)
        return math.inf if abar <= 0 else ((1 - abar) / abar) ** 0.5

    # tensors
    def _alpha_sigma(self, t):
        abar = self.alpha_bars(t)
        return abar.sqrt(), (1 - abar).sqrt()

    def alpha_bars(self, t: torch.Tensor) -> torch.Tensor:
        """abar at times ``t`` (float64; integer t from the table, real t interpolated, t < 0 gives 1)."""
        t = as_time_tensor(t)
        if not t.is_floating_point():
            return self.alphas_cumprod.to(t.device)[t]
        abar = alpha_bar_at(self.alphas_cumprod.to(t.device), t.clamp(min=0).double())
        return torch.where(t < 0, 1.0, abar)

    def coefficients(self, t, like):
        t = as_time_tensor(t, like.device)
        if t.is_floating_point():
            abar = self.alpha_bars(t).to(like.dtype)
        else:  # integer timesteps (training): the float32 table, gathered on the device
            abar = self.table("alphas_cumprod", like.device)[t].to(like.dtype)
        if t.ndim:
            abar = abar.reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def snr(self, t):
        t = as_time_tensor(t)
        if not t.is_floating_point():
            return self.table("snr", t.device)[t]
        abar = self.alpha_bars(t)
        return (abar / (1 - abar)).float()

    def log_snr(self, t):
        abar = self.alpha_bars(t)
        return (abar.log() - (1 - abar).log()).float()

    def _time_at_log_snr(self, lam):
        return self.time_at_ve_sigma(torch.exp(-0.5 * lam))

    def time_at_log_snr(self, lam, clamp=False):
        """The real timesteps whose log-SNR is ``lam``; one outside the table's range is an error (``clamp``: its
        nearest end)."""
        return self.time_at_ve_sigma(torch.exp(-0.5 * torch.as_tensor(lam, dtype=F64)), clamp)

    def time_at_ve_sigma(self, sigma, clamp=False):
        """The real timesteps whose Karras sigma is ``sigma`` (:func:`~diffexp.schedules.timestep_at_sigma`: an
        error outside the table's range unless ``clamp``)."""
        return timestep_at_sigma(self.alphas_cumprod, sigma, clamp=clamp)

    def ve_sigma_range(self) -> tuple[float, float]:
        """(smallest, largest) Karras sigma of the table, as the table gives them."""
        sigmas = sigmas_of(self.alphas_cumprod)
        return float(sigmas[0]), float(sigmas[-1])

    def noise_input(self, t):
        return t

    def time_tensor(self, t, n, device):
        integer = float(t).is_integer()
        return torch.full((n,), int(t) if integer else float(t), dtype=torch.long if integer else torch.float32,
                          device=device)

    def __repr__(self):
        return f"DiscretePath({self.schedule.name!r}, T={self.num_timesteps})"


@PATHS.register("cosine")
class CosinePath(GaussianPath):
    """Variance preserving in continuous time t in [0, 1]: alpha_t^2 = f(t) / f(0), sigma_t^2 = 1 - alpha_t^2 with
    f(t) = cos^2((t + s) / (1 + s) pi / 2) (Nichol & Dhariwal 2021, eq. 17, without the discrete betas' clipping;
    s = 0 is Salimans & Ho 2022's alpha_t = cos(pi t / 2)). alpha_1 = 0: pure noise at t = 1. The net gets 1000 t.

    Args:
        s: the offset s (0.008 as ``schedule=cosine``).
        t_min, t_max: the trained range and the samplers' start (t_max < 1 for epsilon prediction or Karras
            spacing, which need alpha > 0 there).
    """

    variance_preserving = True
    default_spacing = "trailing"

    def __init__(self, s: float = 0.008, t_min: float = 0.0, t_max: float = 1.0, noise_input_scale: float = 1000.0):
        check_range("path", t_min, t_max, 0.0, 1.0)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ValueError(f"path.s (the cosine offset) must lie in [0, 1), got {s!r}")
        super().__init__(t_min, t_max)
        self.s, self.noise_input_scale = float(s), float(noise_input_scale)
        self.name = "cosine"

    def _angle(self, t):
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def _alpha_sigma(self, t):
        angle, angle0 = self._angle(t), self._angle(torch.zeros((), dtype=F64))
        alpha = torch.where(t >= 1, 0.0, torch.cos(angle) / torch.cos(angle0))
        # 1 - cos^2(a) / cos^2(a0) = sin(a - a0) sin(a + a0) / cos^2(a0): no cancellation near t = 0
        variance = torch.sin(angle - angle0) * torch.sin(angle + angle0) / torch.cos(angle0) ** 2
        return alpha, torch.where(t >= 1, 1.0, variance.clamp(min=0).sqrt())

    def _time_at_log_snr(self, lam):
        cos_angle = math.cos(self._angle(0.0)) * torch.sigmoid(lam).sqrt()
        return (torch.acos(cos_angle) * (2 / math.pi) * (1 + self.s) - self.s).clamp(0.0, 1.0)

    def noise_input(self, t):
        return self.noise_input_scale * t


@PATHS.register("edm")
class EDMPath(GaussianPath):
    """Variance exploding, as EDM (Karras et al. 2022): alpha = 1, sigma = t; samplers run from sigma_max to
    sigma_min and then to 0. Any sigma > 0 is valid (EDM's log-normal training density is unbounded). The net gets
    c_noise = noise_input_scale * ln sigma (EDM: 1/4)."""

    default_spacing = "karras"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, noise_input_scale: float = 0.25):
        check_range("path (sigma_min, sigma_max)", sigma_min, sigma_max)
        if not sigma_min > 0:
            raise ValueError(f"path.sigma_min must be positive, got {sigma_min}")
        super().__init__(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max, self.noise_input_scale = float(sigma_min), float(sigma_max), float(noise_input_scale)
        self.name = "edm"

    def alpha_sigma(self, t):
        return 1.0, float(t)

    def _alpha_sigma(self, t):
        return torch.ones_like(t), t

    def _time_at_log_snr(self, lam):
        return torch.exp(-0.5 * lam)

    def time_at_log_snr(self, lam, clamp=False):
        """sigma = exp(-lambda / 2): every sigma > 0 is a time of this path, so nothing is clamped."""
        return self._time_at_log_snr(torch.as_tensor(lam, dtype=F64))

    def noise_input(self, t):
        return self.noise_input_scale * t.log()


@PATHS.register("flow")
class FlowPath(GaussianPath):
    """The rectified-flow / flow-matching path alpha = 1 - t, sigma = t on t in [0, 1]: straight lines from data
    (t = 0) to noise (t = 1), velocity dx_t/dt = eps - x_0. The net gets 1000 t (as diffusers' and SD3's
    ``FlowMatchEulerDiscreteScheduler`` timesteps). SD3's timestep shift is the ``shifted`` spacing and the
    ``shift`` of the logit-normal density."""

    default_spacing = "trailing"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0, noise_input_scale: float = 1000.0):
        check_range("path", t_min, t_max, 0.0, 1.0)
        super().__init__(t_min, t_max)
        self.noise_input_scale = float(noise_input_scale)
        self.name = "flow"

    def alpha_sigma(self, t):
        return 1.0 - t, float(t)

    def _alpha_sigma(self, t):
        return 1.0 - t, t

    def _time_at_log_snr(self, lam):
        return torch.sigmoid(-0.5 * lam)

    def noise_input(self, t):
        return self.noise_input_scale * t


def as_time_tensor(t, device=None) -> torch.Tensor:
    """Times as a tensor: Python floats as float64 (a real timestep keeps its digits), ints as int64, tensors as
    they are (moved to ``device`` if given)."""
    if isinstance(t, torch.Tensor):
        return t if device is None else t.to(device)
    dtype = torch.long if isinstance(t, int) and not isinstance(t, bool) else F64
    return torch.as_tensor(t, dtype=dtype, device=device)


def as_path(path_or_schedule) -> GaussianPath:
    """A :class:`GaussianPath` as is; a :class:`~diffexp.schedules.NoiseSchedule` as its :class:`DiscretePath`."""
    if isinstance(path_or_schedule, GaussianPath):
        return path_or_schedule
    if isinstance(path_or_schedule, NoiseSchedule):
        return DiscretePath(path_or_schedule)
    raise ValueError(f"expected a Gaussian path (diffexp.paths) or a noise schedule, got {type(path_or_schedule).__name__}")


def time_at_fraction(path: GaussianPath, fraction: float, rho: float = 7.0) -> float:
    """The time ``fraction`` of the way from the clean end (0: ``t_min``) to the noisiest trained time (1: ``t_max``)
    on the clock the path's samplers step on by default: EDM's sigma on Karras et al.'s ramp
    sigma = (sigma_min^(1/rho) + fraction (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho (their eq. 5, rho = 7), equal
    steps of t on the other paths (a discrete path's real timestep)."""
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if isinstance(path, EDMPath):
        return karras_ramp(1.0 - fraction, path.sigma_min, path.sigma_max, rho)
    return path.grid_time(fraction)


def flow_time(path: GaussianPath, t: float) -> float:
    """u = sigma / (alpha + sigma): the time on the flow path with t's log-SNR (0 clean, 1 pure noise)."""
    alpha, sigma = path.alpha_sigma(t)
    return sigma / (alpha + sigma)


def shift_flow_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23): u' = shift u / (1 + (shift - 1) u); in log-SNR terms
    lambda' = lambda - 2 ln(shift)."""
    return shift * u / (1 + (shift - 1) * u)
