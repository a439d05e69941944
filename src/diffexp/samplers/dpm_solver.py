"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): multistep solvers of the probability-flow ODE in data prediction, and the SDE variant.

In lambda_t = log(alpha_t / sigma_t) (x_t = alpha_t x_0 + sigma_t eps on any Gaussian path) the ODE's exact
solution from s to t is x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda;
the solvers approximate x0(lambda) by the last ``order`` predictions (h = lambda_t - lambda_s, D0 = x0 at s):

    1st order:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0                     (= DDIM)
    2M:         ... - 0.5 alpha_t (e^-h - 1) D1,  D1 = (D0 - x0_prev) / r0,  r0 = h_prev / h
    3M:         ... + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 0.5) D2

The SDE variant (Lu et al. 2022b, Appendix; ``eta`` as in k-diffusion's ``sample_dpmpp_2m_sde``, eta = 1 is
diffusers' ``sde-dpmsolver++``) replaces e^-h by e^-(1+eta)h in the x0 terms, scales x_s by e^-eta h and adds
sigma_t sqrt(1 - e^-2 eta h) z. The first step is first order (no history yet); the step to the clean time
(sigma = 0) is always first order, it returns the last x0 prediction; with ``lower_order_final`` runs of fewer than 15
steps also use at most second order on the step before it (diffusers' rule).
"""
from __future__ import annotations

import math

from diffexp.samplers.base import SpacedSampler, checked_eta, randn


class DPMSolverPlusPlus(SpacedSampler):
    """Multistep DPM-Solver++ of ``order`` 1, 2 or 3, deterministic (``eta`` = 0) or stochastic (``eta`` > 0,
    orders 1 and 2). Default spacing: karras (rho = 7)."""

    default_spacing = "karras"
    default_order = 2
    default_eta = 0.0

    def __init__(self, path, steps: int = 20, order: int | None = None, eta: float | None = None,
                 lower_order_final: bool = True, timestep_spacing: str | None = None, **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        self.order = self.default_order if order is None else order
        self.eta = checked_eta(self.default_eta if eta is None else eta)
        if self.order not in (1, 2, 3):
            raise ValueError(f"sampler.order must be 1, 2 or 3, got {self.order!r}")
        if self.eta > 0 and self.order == 3:
            raise ValueError("the stochastic DPM-Solver++ (sampler.eta > 0) has orders 1 and 2, not 3")
        self.lower_order_final = lower_order_final

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, _ = denoiser(x_t, t)
        history = state.setdefault("history", [])  # (lambda, x0) of the steps so far, newest last
        history.append((denoiser.half_log_snr(t), x0))
        del history[:-self.order]
        left = self.steps_left(t)
        order = min(self.order, len(history))
        if left == 1:
            order = 1
        elif left == 2 and self.lower_order_final and len(self.timesteps) < 15:
            order = min(order, 2)
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype) if self.eta > 0 else None
        return self.update(denoiser, x_t, t, t_prev, history, order, noise), x0

    def update(self, denoiser, x, s, t, history, order, noise=None):
        """x at ``t`` from x at ``s`` and the x0 ``history`` [(lambda, x0), ...] (newest last)."""
        sigma_s, (alpha_t, sigma_t) = denoiser.alpha_sigma(s)[1], denoiser.alpha_sigma(t)
        lam_s, lam_t = history[-1][0], denoiser.half_log_snr(t)
        h = lam_t - lam_s
        eta_h = self.eta * h if self.eta > 0 else 0.0
        decay = -math.expm1(-h - eta_h)  # 1 - e^-(1+eta)h
        D0 = history[-1][1]
        x_t = (sigma_t / sigma_s * math.exp(-eta_h)) * x + (alpha_t * decay) * D0
        if order >= 2:
            D1 = slope(history[-1], history[-2], h)
            if order == 2:
                x_t = x_t + (0.5 * alpha_t * decay) * D1
            else:
                D1_prev = slope(history[-2], history[-3], h)  # slopes are already divided by r0, r1
                r0, r1 = (history[-1][0] - history[-2][0]) / h, (history[-2][0] - history[-3][0]) / h
                D2 = (1.0 / (r0 + r1)) * (D1 - D1_prev)
                D1 = D1 + r0 * D2
                phi_1 = math.expm1(-h)
                x_t = x_t + (alpha_t * (phi_1 / h + 1.0)) * D1 - (alpha_t * ((phi_1 + h) / h**2 - 0.5)) * D2
        if noise is not None and sigma_t > 0:
            x_t = x_t + (sigma_t * math.sqrt(-math.expm1(-2.0 * eta_h))) * noise
        return x_t


def slope(newer, older, h):
    """(x0_newer - x0_older) / r with r = (lambda_newer - lambda_older) / h: the divided difference the
    multistep formulas use; 0 when the older point has infinite noise (it carries no slope information)."""
    r = (newer[0] - older[0]) / h
    return (newer[1] - older[1]) * (1.0 / r) if math.isfinite(r) and r != 0 else 0.0 * newer[1]


class DPMSolver2M(DPMSolverPlusPlus):
    """DPM-Solver++(2M), the deterministic second-order multistep solver ("DPM++ 2M Karras")."""


class DPMSolver3M(DPMSolverPlusPlus):
    """DPM-Solver++(3M): third-order multistep (first two steps of lower order)."""

    default_order = 3


class DPMSolver2MSDE(DPMSolverPlusPlus):
    """DPM-Solver++(2M) SDE: the stochastic variant (eta = 1 by default; eta = 0 gives 2M)."""

    default_eta = 1.0
