"""Post-hoc EMA's mathematics (Karras et al. 2024, EDM2, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3 and Appendix C), pure numpy/torch: power-function EMA profiles and the least-squares reconstruction
of any EMA length from snapshots of two of them. The callback (:class:`diffexp.callbacks.EMA`, ``posthoc=true``)
tracks and snapshots the profiles; ``python -m diffexp.ema`` (:mod:`diffexp.ema`) reconstructs.

A power-function EMA after update t (t = 1, 2, ...) is theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,
beta_t = (1 - 1/t)^(gamma + 1): its weight on past steps follows p(tau) ~ tau^gamma, a profile that scales with
training time. Its length is sigma_rel, the profile's std relative to its time:
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). A target profile p is reconstructed from snapshots of
profiles p_i as sum_i x_i p_i with x minimising ||sum_i x_i p_i - p||_2 over the continuous profiles (the normal
equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p>, inner products in closed form).
"""
from __future__ import annotations

import math

import numpy as np
import torch

MAX_SIGMA_REL = math.sqrt(1 / 12)  # gamma = 0: the uniform average of all steps


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 of the power profile with relative std ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, s = sigma_rel^-2 (EDM2, eq. 3 solved for gamma)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}] (sqrt(1/12): the plain average of all "
                         f"steps), got {sigma_rel!r}")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    """sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of update t >= 1 (0 at t = 1: the first average is the weights)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = int_0^min(t_a, t_b) p_a(tau) p_b(tau) dtau for p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
    [0, t]: (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1)
    t_b^(gamma_b + 1)), m = min(t_a, t_b), computed in the overflow-free form (t_a / t_b)^gamma_b / t_b for t_a <= t_b.
    Broadcasts over arrays."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.where(t_a <= t_b, (t_a / t_b) ** g_b / t_b, (t_b / t_a) ** g_a / t_a)
    return (g_a + 1) * (g_b + 1) * ratio / (g_a + g_b + 1)


def posthoc_coefficients(steps, gammas, target_step: float, target_gamma: float) -> np.ndarray:
    """x minimising ||sum_i x_i p_i - p_target||_2 for snapshots of profiles (steps[i], gammas[i]) (least squares on
    the normal equations; a snapshot equal to the target gives x = its unit vector)."""
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    A = profile_inner(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = profile_inner(steps, gammas, target_step, target_gamma)
    return np.linalg.lstsq(A, b, rcond=None)[0]


def combine(snapshots: list[dict[str, torch.Tensor]], coefficients) -> dict[str, torch.Tensor]:
    """sum_i x_i snapshot_i per tensor, accumulated in float64, returned in each tensor's dtype."""
    out = {}
    for key, first in snapshots[0].items():
        total = torch.zeros_like(first, dtype=torch.float64)
        for x, snapshot in zip(coefficients, snapshots):
            total += float(x) * snapshot[key].double()
        out[key] = total.to(first.dtype)
    return out
