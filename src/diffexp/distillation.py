"""Few-step generation by training, as objectives on any Gaussian path (pure torch).

Each objective takes the student's raw net function ``student(net input, noise input) -> F`` (conditions bound) and,
where it needs one, a frozen teacher ``teacher(x_t, t) -> (x_0, eps)``; times are the path's (:mod:`diffexp.paths`)
and noise levels Karras et al.'s sigma = sigma_t / alpha_t, so the same code distils a DDPM, EDM or flow model.

- :class:`ConsistencyObjective`: consistency training / distillation (Song et al. 2023) with the student as its own
  target (stop-gradient, no EMA target), the continuous-time Delta-t schedule, pseudo-Huber metric and 1 / Delta-t
  weighting of easy consistency tuning (ECT, Geng et al. 2024). The consistency function is the denoiser written as
  f(x, t) = c_skip(t) x + c_out(t) F(x, t) (:meth:`~diffexp.diffusion.Prediction.x0_coefficients`), with c_skip = 1
  and c_out = 0 at the clean time: f(x, clean) = x exactly.
- :class:`ProgressiveObjective`: progressive distillation (Salimans & Ho 2022, Alg. 2): one student DDIM step on
  an N-step grid matches two teacher DDIM steps on the 2N-step grid.
- reflow (Liu et al. 2023) needs no objective of its own: it is the model's flow-matching objective
  (:meth:`diffexp.objectives.Objective.loss`) on fixed (noise, sample) couplings of the teacher's ODE.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

from diffexp.diffusion import Prediction
from diffexp.paths import GaussianPath

RawFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (net input, noise input) -> the net's raw output
TeacherFn = Callable[[torch.Tensor, torch.Tensor], tuple]  # (x_t, t) -> (x_0, eps)
CONSISTENCY_TARGETS = ("data", "teacher")
TEACHER_SOLVERS = ("euler", "heun")


def check_boundary(prediction: Prediction, option: str = "model.prediction_type") -> None:
    """A clear error for a prediction whose consistency function misses the boundary condition f(x, clean) = x
    (``sample``: x_0 = F, with no skip connection to x)."""
    c_skip, c_out = prediction.x0_coefficients(torch.tensor(1.0), torch.tensor(0.0), True)
    if float(c_skip) != 1.0 or float(c_out) != 0.0:
        raise ValueError(f"{option}={prediction!r}: its denoiser is x_0 = {float(c_skip):g} x + {float(c_out):g} F at "
                         f"the clean time, so f(x, clean) = x does not hold; consistency models need a skip "
                         f"connection: epsilon, v_prediction, velocity or edm")


def consistency_function(raw_fn: RawFn, prediction: Prediction, path: GaussianPath, x_t: torch.Tensor,
                         t: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) F(x_t, t) per item (:meth:`Prediction.x0_coefficients`); items at the
    path's clean time get x_t itself and the net is not called for them (f(x, clean) = x)."""
    alpha, sigma = path.coefficients(t, x_t)
    c_skip, c_out = prediction.x0_coefficients(alpha, sigma, path.variance_preserving)
    clean = (t == path.clean_time)
    if bool(clean.all()):
        return x_t.clone()
    raw = raw_fn(prediction.net_input(x_t, alpha, sigma), path.noise_input(t)).to(x_t.dtype)
    f = c_skip * x_t + c_out * raw
    if bool(clean.any()):
        f = torch.where(clean.reshape(-1, *[1] * (x_t.ndim - 1)), x_t, f)
    return f


def ect_sigma_r(sigma_t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's mapping t -> r (Geng et al. 2024): r = t (1 - q^-(stage + 1) (1 + k sigmoid(-b t))), clamped at 0, in
    EDM's sigma (data std 0.5). Delta-t = t - r halves (q = 2) with each stage: early stages regress on the data
    (r = 0), later ones tie neighbouring noise levels ever closer."""
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * sigma_t))
    return (sigma_t * ratio).clamp(min=0)


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||d||^2 + c^2) - c per item (Song & Dhariwal 2023); c = 0 is the L2 norm ||d||."""
    squared = difference.float().flatten(1).square().sum(1)
    return (squared + c**2).sqrt() - c


@contextmanager
def same_randomness(seed: int, device: torch.device):
    """Within the block the global RNG (dropout) restarts from ``seed``, the caller's state restored after: two
    net calls under the same seed draw the same dropout masks."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ConsistencyObjective:
    """Consistency tuning / distillation with ECT's recipe (Geng et al. 2024, "Consistency Models Made Easy").

    For x_0 and one noise eps: sigma_t ~ log-normal(P_mean, P_std) (EDM's sigma), sigma_r = :func:`ect_sigma_r` at
    the current stage (stage = step // stage_steps), t and r the path's times at those sigmas, x_t = alpha_t (x_0 +
    sigma_t eps), and

        L = || f(x_t, t) - stopgrad f(x_r, r) ||_c / (sigma_t - sigma_r)      (pseudo-Huber ||d||_c)

    with the same dropout masks in both calls; f(x_r, r) = x_0 where sigma_r = 0. ``target``: ``data`` is
    consistency *training* (x_r = alpha_r (x_0 + sigma_r eps), the same noise: ECT, no teacher needed); ``teacher``
    is consistency *distillation* (Song et al. 2023): x_r is one step of the teacher's probability-flow ODE from
    x_t (``solver`` euler = DDIM, or heun), except where r reaches the clean time (most items in the first stages):
    there the target is the data x_0 itself, as in ECT, not the teacher's one-step estimate of it.

    Args:
        path, prediction: the student's.
        P_mean, P_std: the log-normal of sigma_t (ECT on CIFAR-10: -1.1, 2.0).
        q, k, b: the Delta-t schedule (:func:`ect_sigma_r`; ECT: 2, 8, 1).
        c: the pseudo-Huber constant; ``auto`` = 0.00054 sqrt(dim x_0) (Song & Dhariwal 2023).
        stage_steps: optimizer steps per stage of the Delta-t schedule.
    """

    def __init__(self, path: GaussianPath, prediction: Prediction, P_mean: float = -1.1, P_std: float = 2.0,
                 q: float = 2.0, k: float = 8.0, b: float = 1.0, c: float | str = "auto", stage_steps: int = 200,
                 target: str = "data", solver: str = "euler"):
        check_boundary(prediction)
        if target not in CONSISTENCY_TARGETS:
            raise ValueError(f"distill.target={target!r}; allowed: {list(CONSISTENCY_TARGETS)} (data: consistency "
                             f"tuning, teacher: consistency distillation)")
        if solver not in TEACHER_SOLVERS:
            raise ValueError(f"distill.solver={solver!r}; allowed: {list(TEACHER_SOLVERS)}")
        for name, value in (("P_std", P_std), ("k", k), ("b", b)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"distill.{name} must be a number >= 0, got {value!r}")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 1:
            raise ValueError(f"distill.q must be a number > 1 (Delta-t shrinks by q each stage), got {q!r}")
        if not (c == "auto" or (isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0)):
            raise ValueError(f"distill.c must be auto or a number >= 0 (the pseudo-Huber constant), got {c!r}")
        if isinstance(stage_steps, bool) or not isinstance(stage_steps, int) or stage_steps < 1:
            raise ValueError(f"distill.stage_steps must be a positive integer, got {stage_steps!r}")
        self.path, self.prediction = path, prediction
        self.P_mean, self.P_std, self.q, self.k, self.b = float(P_mean), float(P_std), float(q), float(k), float(b)
        self.c, self.stage_steps, self.target, self.solver = c, stage_steps, target, solver

    def stage(self, step: int) -> int:
        return step // self.stage_steps

    def huber_c(self, x0: torch.Tensor) -> float:
        return 0.00054 * math.sqrt(x0[0].numel()) if self.c == "auto" else float(self.c)

    def ve_sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t / alpha_t at float64 times (0 at the clean time)."""
        alpha, sigma = self.path.coefficients(t, torch.zeros(len(t), dtype=torch.float64))
        return sigma / alpha

    def times(self, n: int, step: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, ...]:
        """(t, r, sigma_t, sigma_r) for ``n`` items: sigma_t log-normal (clamped to the path's range), sigma_r of the
        stage; t and r the path's times (r the clean time where sigma_r = 0). Float64 on ``device``."""
        normal = torch.randn(n, generator=generator, device=device, dtype=torch.float64).cpu()
        t = self.path.time_at_ve_sigma((self.P_mean + self.P_std * normal).exp(), clamp=True)
        sigma_t = self.ve_sigmas(t)
        sigma_r = ect_sigma_r(sigma_t, self.stage(step), self.q, self.k, self.b)
        r = torch.full_like(sigma_t, self.path.clean_time)
        positive = sigma_r > 0
        if bool(positive.any()):
            r[positive] = self.path.time_at_ve_sigma(sigma_r[positive], clamp=True)
        # the sigmas the path realises (clamping to its range moves a few)
        sigma_r = self.ve_sigmas(r)
        return t.to(device), r.to(device), sigma_t.to(device), sigma_r.to(device)

    def teacher_step(self, teacher: TeacherFn, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     sigma_t: torch.Tensor, sigma_r: torch.Tensor) -> torch.Tensor:
        """x_r by one step of the teacher's probability-flow ODE in (x / alpha, sigma): Euler (= DDIM)
        x_r / alpha_r = x_0 + sigma_r eps, or Heun's correction with eps at the Euler point (not at the clean time)."""
        alpha_r, _ = self.path.coefficients(r, x_t)
        shape = (-1, *[1] * (x_t.ndim - 1))
        s_t, s_r = sigma_t.to(x_t.dtype).reshape(shape), sigma_r.to(x_t.dtype).reshape(shape)
        x0, eps = teacher(x_t, t)
        x_r = alpha_r * (x0 + s_r * eps)
        if self.solver == "heun":
            inner = r != self.path.clean_time
            if bool(inner.any()):
                _, eps_r = teacher(x_r, r)
                corrected = alpha_r * (x0 + s_r * eps + (s_r - s_t) * (eps_r - eps) / 2)
                x_r = torch.where(inner.reshape(shape), corrected, x_r)
        return x_r

    def loss(self, student: RawFn, x0: torch.Tensor, generator: torch.Generator | None, step: int,
             teacher: TeacherFn | None = None) -> torch.Tensor:
        """The consistency loss of a batch of x_0 at optimizer step ``step`` (see the class docstring)."""
        n = x0.shape[0]
        t, r, sigma_t, sigma_r = self.times(n, step, generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.path.noised(x0, t, noise)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x0.device))
        with same_randomness(seed, x0.device):
            f_t = consistency_function(student, self.prediction, self.path, x_t, t)
        with torch.no_grad():
            if self.target == "teacher":
                if teacher is None:
                    raise ValueError("distill.target=teacher (consistency distillation) needs the teacher (init_from=)")
                x_r = self.teacher_step(teacher, x_t, t, r, sigma_t, sigma_r)
            else:
                x_r = self.path.noised(x0, r, noise)
            with same_randomness(seed, x0.device):
                f_r = consistency_function(student, self.prediction, self.path, x_r, r)
            f_r = torch.where((r == self.path.clean_time).reshape(-1, *[1] * (x0.ndim - 1)), x0, f_r)
        distance = pseudo_huber(f_t - f_r, self.huber_c(x0))
        return (distance / (sigma_t - sigma_r).float().clamp(min=1e-8)).mean()

    def __repr__(self) -> str:
        return (f"ConsistencyObjective(target={self.target}, P_mean={self.P_mean:g}, P_std={self.P_std:g}, q={self.q:g}, "
                f"k={self.k:g}, b={self.b:g}, c={self.c}, stage_steps={self.stage_steps})")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_to, sigma_to) -> torch.Tensor:
    """Deterministic DDIM to another time: alpha' x_0 + sigma' eps (Song et al. 2021, eq. 12 with eta = 0)."""
    return alpha_to * x0 + sigma_to * eps


class ProgressiveObjective:
    """Progressive distillation (Salimans & Ho 2022, Alg. 2) on the trailing grid of ``N`` student steps,
    t_i = clean + i (t_max - clean) / N (i = 1..N), which nests the teacher's 2N-step grid.

    For x_0, eps and i ~ U{1..N}: x_t = alpha_t x_0 + sigma_t eps; two teacher DDIM steps t -> t' = t - D/2 ->
    t'' = t - D (D = (t_max - clean) / N) give x_t''; the student's target is the x_0 from which one DDIM step from
    x_t lands on x_t'':

        x~_0 = (x_t'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - sigma_t'' alpha_t / sigma_t),
        eps~ = (x_t - alpha_t x~_0) / sigma_t,

    regressed in the student's own prediction (``prediction.target(x~_0, eps~)``) with the model's loss weighting
    (``weights(t, alpha, sigma)``).
    """

    def __init__(self, path: GaussianPath, prediction: Prediction, weights: Callable | None = None):
        self.path, self.prediction, self.weights = path, prediction, weights

    def grid(self, steps: int) -> torch.Tensor:
        """t_N > ... > t_1 (descending, float64), the trailing grid of ``steps`` steps (the clean time after t_1)."""
        clean, t_max = self.path.clean_time, self.path.t_max
        return clean + (t_max - clean) * torch.arange(steps, 0, -1, dtype=torch.float64) / steps

    def target(self, teacher: TeacherFn, x_t: torch.Tensor, t: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
        """(x~_0, eps~): the x_0 and eps whose single DDIM step from (x_t, t) matches two teacher steps."""
        spacing = (self.path.t_max - self.path.clean_time) / steps
        t_mid, t_end = t - spacing / 2, t - spacing
        t_end = torch.where(t_end <= self.path.clean_time + 1e-9 * spacing, self.path.clean_time, t_end)
        alpha, sigma = self.path.coefficients(t, x_t)
        x0, eps = teacher(x_t, t)
        a_mid, s_mid = self.path.coefficients(t_mid, x_t)
        x_mid = ddim_step(x0, eps, a_mid, s_mid)
        x0, eps = teacher(x_mid, t_mid)
        a_end, s_end = self.path.coefficients(t_end, x_t)
        x_end = ddim_step(x0, eps, a_end, s_end)
        ratio = s_end / sigma
        x0_target = (x_end - ratio * x_t) / (a_end - ratio * alpha)
        return x0_target, (x_t - alpha * x0_target) / sigma

    def loss(self, student: RawFn, teacher: TeacherFn, x0: torch.Tensor, generator: torch.Generator | None,
             steps: int) -> torch.Tensor:
        """The distillation loss for a student of ``steps`` DDIM steps on a batch of x_0."""
        n = x0.shape[0]
        index = torch.randint(0, steps, (n,), generator=generator, device=x0.device).cpu()
        t = self.grid(steps)[index].to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.path.noised(x0, t, noise)
        alpha, sigma = self.path.coefficients(t, x0)
        with torch.no_grad():
            x0_target, eps_target = self.target(teacher, x_t, t, steps)
        target = self.prediction.target(x0_target, eps_target, x_t, alpha, sigma)
        raw = student(self.prediction.net_input(x_t, alpha, sigma), self.path.noise_input(t))
        per_item = (raw.float() - target.float()).square().flatten(1).mean(1)
        if self.weights is not None:
            per_item = per_item * self.weights(t, alpha, sigma).float()
        return per_item.mean()


__all__ = ["ConsistencyObjective", "ProgressiveObjective", "consistency_function", "check_boundary", "ect_sigma_r",
           "pseudo_huber", "same_randomness", "ddim_step", "CONSISTENCY_TARGETS", "TEACHER_SOLVERS"]
