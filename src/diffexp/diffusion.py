"""Forward process q(x_t | x_0), training targets and loss weights (pure torch).

Notation (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I).
A network predicts one of
- ``epsilon``:      eps
- ``sample``:       x_0
- ``v_prediction``: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0   (Salimans & Ho 2022)
and :func:`prediction_to_x0_eps` turns any of them into (x_0, eps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {list(PREDICTION_TYPES)}")
    return prediction_type


def gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] cast to like's dtype/device and shaped (N, 1, ..., 1) to broadcast over like."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    abar = gather(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The regression target for ``prediction_type``: eps, x_0, or v = sqrt(abar) eps - sqrt(1-abar) x_0."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    abar = gather(alphas_cumprod, t, x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def x0_eps_from_prediction(
    prediction: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a model prediction at x_t, given abar at its time (broadcastable to x_t).

    epsilon: x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
    sample:  eps = (x_t - sqrt(abar) x_0) / sqrt(1-abar)
    v:       x_0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(1-abar) x_t + sqrt(abar) v
    """
    check_prediction_type(prediction_type)
    sqrt_abar, sqrt_one_minus = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        eps = prediction
        x0 = (x_t - sqrt_one_minus * eps) / sqrt_abar
    elif prediction_type == "sample":
        x0 = prediction
        eps = (x_t - sqrt_abar * x0) / sqrt_one_minus
    else:
        x0 = sqrt_abar * x_t - sqrt_one_minus * prediction
        eps = sqrt_one_minus * x_t + sqrt_abar * prediction
    return x0, eps


def prediction_to_x0_eps(
    prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a model prediction at (x_t, integer t) to the implied (x_0, eps) (:func:`x0_eps_from_prediction`)."""
    return x0_eps_from_prediction(prediction, x_t, gather(alphas_cumprod, t, x_t), prediction_type)


def min_snr_weight(snr: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), expressed for each prediction type.

    epsilon: min(SNR, g) / SNR;  v_prediction: min(SNR, g) / (SNR + 1);  sample: min(SNR, g).
    At SNR = 0 the epsilon weight takes its limit 1.
    """
    check_prediction_type(prediction_type)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    snr: torch.Tensor,
    prediction_type: str,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted by min-SNR-gamma, averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(snr.to(per_sample.device)[t], prediction_type, min_snr_gamma).float()
    return per_sample.mean()


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
