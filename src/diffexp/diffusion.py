"""What a denoiser predicts, and the one conversion of any prediction to (x_0, eps) (pure torch).

On a Gaussian path x_t = alpha x_0 + sigma eps (:mod:`diffexp.paths`) a network predicts one of

- ``epsilon``:      eps                                    (Ho et al. 2020)
- ``sample``:       x_0
- ``v_prediction``: v = alpha eps - sigma x_0              (Salimans & Ho 2022)
- ``velocity``:     u = eps - x_0                           (flow matching: dx_t/dt on the path alpha = 1 - t, sigma = t)
- ``edm``:          EDM's preconditioned F (Karras et al. 2022, Table 1): the net sees c_in x / alpha and the model
                    is D = c_skip x / alpha + c_out F, an x_0 estimate, with sigma = sigma_t / alpha_t and
                    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)
                    (sd = sigma_data); c_noise is the path's noise input (EDM's path: ln(sigma) / 4).

:func:`to_x0_eps` turns the first four into (x_0, eps) given x_t:

    epsilon:   x_0 = (x_t - sigma eps) / alpha
    sample:    eps = (x_t - alpha x_0) / sigma
    v:         x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),  eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    velocity:  x_0 = (x_t - sigma u) / (alpha + sigma),          eps = (x_t + alpha u) / (alpha + sigma)

(on variance-preserving paths alpha^2 + sigma^2 = 1 and the v formulas lose their denominator). EDM's F is a
wrapper of the net (:meth:`Prediction.model_fn`), so samplers see its D as a ``sample`` prediction.
"""
from __future__ import annotations

from typing import Callable

import torch

from diffexp.registry import Registry

PREDICTIONS = Registry("prediction type")
SAMPLER_PREDICTIONS = ("epsilon", "sample", "v_prediction", "velocity")  # what a sampler's model function may return


def check_prediction_type(prediction_type: str, allowed=SAMPLER_PREDICTIONS) -> str:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {list(allowed)}")
    return prediction_type


def to_x0_eps(prediction: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction_type: str,
              variance_preserving: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a prediction of ``prediction_type`` at x_t, with alpha and sigma of its time (numbers,
    or tensors broadcastable to x_t); ``variance_preserving`` drops the v formulas' alpha^2 + sigma^2 = 1."""
    if prediction_type == "epsilon":
        eps = prediction
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "sample":
        x0 = prediction
        eps = (x_t - alpha * x0) / sigma
    elif prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * prediction
        eps = sigma * x_t + alpha * prediction
        if not variance_preserving:
            norm = alpha**2 + sigma**2
            x0, eps = x0 / norm, eps / norm
    elif prediction_type == "velocity":
        total = alpha + sigma
        x0 = (x_t - sigma * prediction) / total
        eps = (x_t + alpha * prediction) / total
    else:
        check_prediction_type(prediction_type)
    return x0, eps


class Prediction:
    """What the net's raw output means: its regression target, its conversion to the model's prediction (what
    samplers see, :attr:`sampler_type`), the input the net receives and how its squared error scales with the error
    in x_0 (:meth:`error_scale`, used by loss weightings)."""

    name = "prediction"
    sampler_type = "epsilon"

    def net_input(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """What the net sees of x_t (x_t itself but for EDM's c_in scaling)."""
        return x_t

    def output(self, raw: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The model's prediction (of :attr:`sampler_type`) from the net's raw output."""
        return raw

    def target(self, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The regression target of the net's raw output."""
        raise NotImplementedError

    def error_scale(self, snr: torch.Tensor, alpha, sigma, variance_preserving: bool) -> torch.Tensor:
        """c with ||raw error||^2 = c ||x_0 error||^2 for a fixed x_t (per item)."""
        raise NotImplementedError

    def x0_coefficients(self, alpha, sigma, variance_preserving: bool) -> tuple:
        """(c_skip, c_out) with x_0 = c_skip x_t + c_out F, F the net's raw output: the denoiser in the consistency
        models' form (Song et al. 2023, eq. 5). At the clean time (alpha = 1, sigma = 0) every prediction but
        ``sample`` gives c_skip = 1, c_out = 0: f(x, clean) = x, the boundary condition, whatever the net."""
        raise NotImplementedError

    def model_fn(self, net: Callable, path) -> Callable:
        """(x_t, t, **conditions) -> the model's prediction: ``net`` called with :meth:`net_input` of x_t and the
        path's noise input of t (:meth:`diffexp.paths.GaussianPath.noise_input`), its output through :meth:`output`."""
        if type(self).net_input is Prediction.net_input and type(self).output is Prediction.output:
            def plain(x_t, t, **conditions):
                return net(x_t, path.noise_input(t), **conditions)

            return plain

        def preconditioned(x_t, t, **conditions):
            alpha, sigma = path.coefficients(t, x_t)
            raw = net(self.net_input(x_t, alpha, sigma), path.noise_input(t), **conditions)
            return self.output(raw, x_t, alpha, sigma)

        return preconditioned

    def __repr__(self) -> str:
        return self.name


@PREDICTIONS.register("epsilon")
class EpsilonPrediction(Prediction):
    name = sampler_type = "epsilon"

    def target(self, x0, noise, x_t, alpha, sigma):
        return noise

    def error_scale(self, snr, alpha, sigma, variance_preserving):
        return snr  # eps error = -(alpha / sigma) x_0 error

    def x0_coefficients(self, alpha, sigma, variance_preserving):
        return 1 / alpha, -sigma / alpha


@PREDICTIONS.register("sample")
class SamplePrediction(Prediction):
    name = sampler_type = "sample"

    def target(self, x0, noise, x_t, alpha, sigma):
        return x0

    def error_scale(self, snr, alpha, sigma, variance_preserving):
        return torch.ones_like(snr)

    def x0_coefficients(self, alpha, sigma, variance_preserving):
        return 0 * alpha, 1 + 0 * alpha


@PREDICTIONS.register("v_prediction")
class VPrediction(Prediction):
    name = sampler_type = "v_prediction"

    def target(self, x0, noise, x_t, alpha, sigma):
        return alpha * noise - sigma * x0

    def error_scale(self, snr, alpha, sigma, variance_preserving):
        if variance_preserving:  # (alpha^2 + sigma^2)^2 / sigma^2 = 1 / sigma^2 = snr + 1
            return snr + 1
        return ((alpha**2 + sigma**2) / sigma) ** 2

    def x0_coefficients(self, alpha, sigma, variance_preserving):
        norm = 1 if variance_preserving else alpha**2 + sigma**2
        return alpha / norm, -sigma / norm


@PREDICTIONS.register("velocity")
class VelocityPrediction(Prediction):
    name = sampler_type = "velocity"

    def target(self, x0, noise, x_t, alpha, sigma):
        return noise - x0

    def error_scale(self, snr, alpha, sigma, variance_preserving):
        return ((alpha + sigma) / sigma) ** 2

    def x0_coefficients(self, alpha, sigma, variance_preserving):
        return 1 / (alpha + sigma), -sigma / (alpha + sigma)


@PREDICTIONS.register("edm")
class EDMPrediction(Prediction):
    """EDM's preconditioning (Karras et al. 2022, Table 1 and eq. 7) of any path, on the VE-scaled x / alpha."""

    name = "edm"
    sampler_type = "sample"

    def __init__(self, sigma_data: float = 0.5):
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
            raise ValueError(f"model.sigma_data (EDM's data std) must be positive, got {sigma_data!r}")
        self.sigma_data = float(sigma_data)

    def scalings(self, alpha, sigma) -> tuple:
        """(c_skip, c_out, c_in) at sigma / alpha (EDM, Table 1)."""
        ve = sigma / alpha
        sd2 = self.sigma_data**2
        total = ve**2 + sd2
        return sd2 / total, ve * self.sigma_data / total**0.5, 1 / total**0.5

    def net_input(self, x_t, alpha, sigma):
        return self.scalings(alpha, sigma)[2] * (x_t / alpha)

    def output(self, raw, x_t, alpha, sigma):
        c_skip, c_out, _ = self.scalings(alpha, sigma)
        return c_skip * (x_t / alpha) + c_out * raw

    def target(self, x0, noise, x_t, alpha, sigma):
        c_skip, c_out, _ = self.scalings(alpha, sigma)
        return (x0 - c_skip * (x_t / alpha)) / c_out

    def error_scale(self, snr, alpha, sigma, variance_preserving):
        return 1 / self.scalings(alpha, sigma)[1] ** 2

    def x0_coefficients(self, alpha, sigma, variance_preserving):
        c_skip, c_out, _ = self.scalings(alpha, sigma)
        return c_skip / alpha, c_out

    def __repr__(self):
        return f"edm(sigma_data={self.sigma_data:g})"


def get_prediction(prediction_type: str, sigma_data: float = 0.5) -> Prediction:
    """The :class:`Prediction` called ``prediction_type`` (``sigma_data`` for ``edm``)."""
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"model.prediction_type={prediction_type!r} is not supported; choose one of {sorted(PREDICTIONS)}")
    cls = PREDICTIONS[prediction_type]
    return cls(sigma_data) if cls is EDMPrediction else cls()


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) between ``a`` and ``b`` (same shape), one result per weight w:
    sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, theta the angle between the flattened
    vectors. Gaussian noise keeps its norm along the arc (a straight line would pass through low-norm
    noise that a diffusion model never saw). Exact endpoints: w = 0 gives a, w = 1 gives b; nearly parallel
    vectors are interpolated linearly. Returns (len(weights), *a.shape)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp(min=torch.finfo(torch.float64).tiny)
    theta = torch.arccos(cos.clamp(-1, 1))
    w = weights.double().to(a.device).view(-1, *[1] * a.ndim)
    if theta < 1e-4:
        mixed = (1 - w) * a.double() + w * b.double()
    else:
        mixed = (torch.sin((1 - w) * theta) * a.double() + torch.sin(w * theta) * b.double()) / torch.sin(theta)
    mixed = mixed.to(a.dtype)
    mixed[w.flatten() == 0] = a  # sin(theta) / sin(theta) need not round to 1
    mixed[w.flatten() == 1] = b
    return mixed


__all__ = ["PREDICTIONS", "SAMPLER_PREDICTIONS", "Prediction", "EpsilonPrediction", "SamplePrediction", "VPrediction",
           "VelocityPrediction", "EDMPrediction", "get_prediction", "to_x0_eps", "check_prediction_type", "slerp"]
