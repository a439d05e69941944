"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), data-prediction form with B(h) = e^h - 1 ("bh2"), on any Gaussian path.

Each step evaluates the model once at the predicted x_t; before the next prediction that evaluation also
corrects x_t (UniC), so the corrector costs no extra model call. With lambda = log(alpha / sigma),
h = lambda_t - lambda_s0, hh = -h, m0 = x0 at s0 and divided differences D_k = (x0_k - m0) / r_k,
r_k = (lambda_k - lambda_s0) / h over the earlier points:

    UniP (order p):  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_k rho_k D_k
    UniC (order p):  x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^hh - 1) m0
                           - alpha_t B(h) (sum_k rho^c_k D_k + rho^c_p (x0(x_t) - m0))

where rho solves R rho = b with R_ik = r_k^(i-1) and b_i = i! phi_(i+1)(hh) / B(h) (phi_1 = (e^hh - 1)/hh,
phi_(k+1) = (phi_k - 1/k!)/hh); order-2 prediction uses rho = 1/2, order-1 correction rho^c = 1/2
(the paper's choices, as diffusers). The first step is first order; ``lower_order_final`` lowers the order
to the number of steps left; the last step, to sigma = 0, is always first order (it returns the x0 prediction).
Where an ``on_step`` hook replaced part of the predicted x (inpainting), the corrector leaves those values.
"""
from __future__ import annotations

import math

import torch

from diffexp.samplers.base import SpacedSampler


class UniPCSampler(SpacedSampler):
    """UniPC-bh2 multistep predictor-corrector of ``order`` 1-3. Default spacing: karras (rho = 7)."""

    default_spacing = "karras"

    def __init__(self, path, steps: int = 20, order: int = 2, lower_order_final: bool = True,
                 corrector: bool = True, timestep_spacing: str | None = None, **kwargs):
        super().__init__(path, steps=steps, timestep_spacing=timestep_spacing, **kwargs)
        if order not in (1, 2, 3):
            raise ValueError(f"sampler.order must be 1, 2 or 3, got {order!r}")
        self.order, self.lower_order_final, self.corrector = order, lower_order_final, corrector

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        x0, _ = denoiser(x_t, t)
        history = state.setdefault("history", [])  # (lambda, x0) at the points visited, newest last
        lam = denoiser.half_log_snr(t)
        if self.corrector and history:
            corrected = self.unified_update(denoiser, state["x"], state["t"], t, history, state["order"], (lam, x0))
            # where an on_step hook replaced the predicted x (inpainting), its values stay
            x_t = torch.where(x_t == state["predicted"], corrected, x_t)
        history.append((lam, x0))
        del history[:-self.order]
        order = min(self.order, len(history))
        if self.lower_order_final:
            order = min(order, self.steps_left(t))
        if denoiser.is_clean(t_prev):
            order = 1  # to sigma = 0 a higher order extrapolates (h = inf): the step returns the x0 prediction
        predicted = self.unified_update(denoiser, x_t, t, t_prev, history, order)
        state.update(x=x_t, t=t, order=order, predicted=predicted)
        return predicted, x0

    @staticmethod
    def unified_update(denoiser, x, s, t, history, order, new=None):
        """UniP (``new`` None) or UniC (``new`` = (lambda_t, x0 at the predicted x_t)) from ``s`` to ``t``."""
        sigma_s, (alpha_t, sigma_t) = denoiser.alpha_sigma(s)[1], denoiser.alpha_sigma(t)
        lam_s0, m0 = history[-1]
        h = denoiser.half_log_snr(t) - lam_s0
        hh = -h
        phi = math.expm1(hh)  # h phi_1(h) in the paper's notation
        b_h = math.expm1(hh)  # bh2
        ratios, slopes = [], []
        for lam_k, x0_k in reversed(history[:-1][-(order - 1):] if order > 1 else []):
            r = (lam_k - lam_s0) / h
            if math.isfinite(r):  # a point at infinite noise carries no slope information
                ratios.append(r)
                slopes.append((x0_k - m0) / r)
        x_t = (sigma_t / sigma_s) * x - (alpha_t * phi) * m0
        rows = ratios + [1.0]
        n = len(rows) if new is not None else len(ratios)
        b, h_phi_k, factorial = [], phi / hh - 1.0 if math.isfinite(hh) else -1.0, 1
        for i in range(1, len(rows) + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        if new is None:
            if not slopes:
                return x_t
            rho = [0.5] if n == 1 else solve([[r ** (i - 1) for r in ratios] for i in range(1, n + 1)], b[:n])
            return x_t - (alpha_t * b_h) * sum(c * d for c, d in zip(rho, slopes))
        if n == 1:
            rho = [0.5]
        else:
            rho = solve([[r ** (i - 1) for r in rows] for i in range(1, n + 1)], b[:n])
        correction = sum((c * d for c, d in zip(rho[:-1], slopes)), start=0.0 * m0) + rho[-1] * (new[1] - m0)
        return x_t - (alpha_t * b_h) * correction


def solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """The solution of a small linear system, in float64."""
    solution = torch.linalg.solve(torch.tensor(matrix, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return solution.tolist()
