"""What every sampler shares: one loop contract, a model wrapper that counts evaluations, trajectories.

A sampler implements :meth:`Sampler.step`, which receives a :class:`Denoiser` and may call it as often
as it needs (Heun: twice) and keep what it likes in a per-run ``state`` dict (multistep solvers: the
history of model outputs). The loop in :meth:`Sampler.sample` is the same for all samplers; it can start
at an intermediate step from a given x_t (image-to-image) and lets a hook replace part of x after each
step (inpainting).

Samplers run on any Gaussian path (:mod:`diffexp.paths`): a step reads alpha, sigma and the log-SNR of its times
from the denoiser (which asks the path) and never which path it is on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffexp.diffusion import check_prediction_type, to_x0_eps
from diffexp.paths import GaussianPath, as_path
from diffexp.samplers.spacing import spaced_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # model_fn(x_t, t) -> prediction
StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]  # (step index, t_prev, x_prev) -> x_prev


@dataclass
class Trajectory:
    """The result of a sampling run with the intermediate states kept.

    ``xs[i]`` is x at ``timesteps[i]`` (xs[0] is the starting x) and ``x0s[i]`` the x_0 predicted there;
    ``sample`` is the final x_0; ``nfe`` counts the model evaluations made.
    """

    sample: torch.Tensor
    timesteps: list = field(default_factory=list)
    xs: list[torch.Tensor] = field(default_factory=list)
    x0s: list[torch.Tensor] = field(default_factory=list)
    nfe: int = 0


def randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's device keeps samples identical across devices for a given seed.
    """
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def resampling_levels(steps: int, jump_length: int = 10, jump_n_sample: int = 1) -> list[int]:
    """The order in which RePaint (Lugmayr et al. 2022, Alg. 1 and its jump schedule) visits the levels of a
    ``steps``-step run: level k is x after k steps (0: the start, ``steps``: the sample).

    The run goes down one level per sampler step; at every level k = steps - 1 - j * jump_length (j = 0, 1, ...)
    with k >= jump_length it goes back up ``jump_length`` levels (forward noise) ``jump_n_sample - 1`` times and
    descends again, so the region it fills is harmonised with the known one. ``jump_n_sample = 1``: no jumps.
    """
    check_resampling(jump_length, jump_n_sample)
    remaining = {k: jump_n_sample - 1 for k in range(steps - 1, jump_length - 1, -jump_length)}
    levels, k = [0], 0
    while k < steps:
        k += 1
        levels.append(k)
        if remaining.get(k, 0) > 0:
            remaining[k] -= 1
            k -= jump_length
            levels.append(k)
    return levels


def check_resampling(jump_length, jump_n_sample) -> None:
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (RePaint resampling: go back jump_length steps, "
                             f"jump_n_sample - 1 times; jump_n_sample=1 = none), got {value!r}")


def fixed_noise(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """N(0, I) noise of shape (n, *shape) on the CPU from a generator seeded with ``seed``: the same noise
    for the same seed everywhere (monitoring grids, FID samples, figures)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


class Denoiser:
    """``model_fn`` as samplers see it: (x_t, t) -> (x0, eps), counting model evaluations in ``nfe``, with the
    path's alpha, sigma and log-SNR at any time (:mod:`diffexp.paths`).

    ``t`` is a time of the path (on a discrete path an integer timestep in [0, T) or a real one between two); the
    model function receives it as the path's time tensor (:meth:`~diffexp.paths.GaussianPath.time_tensor`).
    ``clip_sample`` clamps x0 to [-1, 1] and recomputes eps from it.
    """

    def __init__(self, model_fn: ModelFn, path: GaussianPath, prediction_type: str, clip_sample: bool = False):
        self.model_fn, self.path = model_fn, path
        self.prediction_type, self.clip_sample = prediction_type, clip_sample
        self.nfe = 0

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t): x_t = alpha_t x_0 + sigma_t eps; (1, 0) at the clean time."""
        return self.path.alpha_sigma(t)

    def variance(self, t: float) -> float:
        """sigma_t^2."""
        return self.path.variance(t)

    def transition(self, s: float, t: float) -> tuple[float, float]:
        """(a, v) of q(x_t | x_s) = N(a x_s, v I), s less noisy than t."""
        return self.path.transition(s, t)

    def half_log_snr(self, t: float) -> float:
        """lambda_t = log(alpha_t / sigma_t), half the log-SNR (Lu et al. 2022): +inf at the clean time, -inf where
        alpha_t = 0 (pure noise)."""
        return self.path.half_log_snr(t)

    def ve_sigma(self, t: float) -> float:
        """Karras et al. (2022)'s sigma_t / alpha_t: x_t / alpha_t = x_0 + sigma eps; 0 at the clean time, inf where
        alpha_t = 0."""
        return self.path.ve_sigma(t)

    def is_clean(self, t: float) -> bool:
        """Whether ``t`` is the path's clean time (the end of sampling)."""
        return t == self.path.clean_time

    def model_output(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The raw prediction of the model at (x_t, t): one model evaluation."""
        self.nfe += 1
        return self.model_fn(x_t, self.path.time_tensor(t, x_t.shape[0], x_t.device))

    def x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: float):
        """(x_0, eps) implied by ``model_output`` at t (:func:`diffexp.diffusion.to_x0_eps`), x_0 optionally clipped."""
        if x_t.dtype == torch.float32:
            alpha, sigma = self.path.conversion_alpha_sigma(t)
        else:
            alpha, sigma = self.path.alpha_sigma(t)
        x0, eps = to_x0_eps(model_output, x_t, alpha, sigma, self.prediction_type, self.path.variance_preserving)
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
            alpha, sigma = self.path.alpha_sigma(t)
            eps = (x_t - alpha * x0) / sigma
        return x0, eps

    def __call__(self, x_t: torch.Tensor, t: float):
        """(x_0, eps) predicted at (x_t, t): one model evaluation. A model function (a guider,
        :mod:`diffexp.guiders`) may return the pair itself; with ``clip_sample`` its x_0 is clamped and eps moved by
        -(alpha / sigma) (x_0' - x_0), what recomputing eps from x_t does for a pair consistent with x_t."""
        output = self.model_output(x_t, t)
        if not isinstance(output, tuple):
            return self.x0_eps(output, x_t, t)
        x0, eps = output
        if self.clip_sample:
            clipped = x0.clamp(-1, 1)
            alpha, sigma = self.path.alpha_sigma(t)
            x0, eps = clipped, eps - (alpha / sigma) * (clipped - x0)
        return x0, eps


class Sampler:
    """Base class: subclasses define ``timesteps`` and ``step``.

    Args:
        path: the Gaussian path the model was trained on (:mod:`diffexp.paths`; a
            :class:`~diffexp.schedules.NoiseSchedule` stands for its discrete path).
        prediction_type: what ``model_fn`` predicts (``epsilon``, ``sample``, ``v_prediction``, ``velocity``).
        clip_sample: clamp the predicted x_0 to [-1, 1] before each update.
        progress: show a progress bar by default.
    """

    #: model evaluations per step (:meth:`nfe` = this x the number of steps unless a subclass says otherwise)
    evaluations_per_step = 1
    #: every step reads the model only through the pair (x0, eps), never x_t itself: x' = alpha' x0 + sigma' eps
    #: (what CFG++ needs, :class:`diffexp.guiders.CFGPlusPlus`)
    steps_from_pair = False
    #: options :meth:`with_options` may change (plain settings; the rest is derived in the constructor)
    adjustable = ("clip_sample", "progress")

    def __init__(
        self,
        path: GaussianPath,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        progress: bool = True,
    ):
        self.path = as_path(path)
        self.prediction_type = check_prediction_type(prediction_type)
        self.clip_sample = clip_sample
        self.progress = progress

    def check_start(self) -> None:
        """A clear error when the model cannot be evaluated where sampling starts: x_0 from an epsilon prediction
        at alpha = 0 (pure noise, e.g. zero terminal SNR or the flow path's t = 1)."""
        first = float(self.timesteps[0])
        if self.prediction_type == "epsilon" and self.path.alpha_sigma(first)[0] == 0.0:
            raise ValueError(
                f"sampling starts at t={first:g}, where alpha = 0 (pure noise: a zero-terminal-SNR schedule, or a "
                f"continuous path's end): x_0 cannot be recovered from an epsilon prediction there; use "
                f"prediction_type=v_prediction, sample or velocity (or a spacing that starts below it)")

    @property
    def timesteps(self) -> torch.Tensor:
        """Descending times visited by the sampler (on a discrete path integers in [0, T), or reals between them)."""
        raise NotImplementedError

    def step_evaluations(self, t, t_prev) -> int:
        """Model evaluations of the step from ``t`` to ``t_prev`` (:attr:`evaluations_per_step` unless a sampler's
        steps differ)."""
        return self.evaluations_per_step

    def nfe(self, start_step: int = 0, jump_length: int = 10, jump_n_sample: int = 1) -> int:
        """Model evaluations of a run from ``timesteps[start_step]`` (what :attr:`Trajectory.nfe` reports), with
        RePaint resampling (:func:`resampling_levels`) when ``jump_n_sample`` > 1."""
        ts = [t.item() for t in self.timesteps][start_step:]
        levels = resampling_levels(len(ts), jump_length, jump_n_sample)
        return sum(self.step_evaluations(ts[a], ts[b] if b < len(ts) else self.path.clean_time)
                   for a, b in zip(levels, levels[1:]) if b > a)

    def with_options(self, **changes) -> "Sampler":
        """A copy with some of the :attr:`adjustable` settings changed (e.g. ``clip_sample=False``); this sampler
        is left as it is. Other settings (steps, spacing) shape the timesteps: build a new sampler for those."""
        unknown = [k for k in changes if k not in self.adjustable]
        if unknown:
            raise ValueError(f"{type(self).__name__}.with_options can change {list(self.adjustable)}, not {unknown}")
        other = copy.copy(self)
        other.__dict__.update(changes)
        return other

    def denoiser(self, model_fn: ModelFn) -> Denoiser:
        """``model_fn`` wrapped for :meth:`step` with this sampler's path, prediction type and clipping."""
        return Denoiser(model_fn, self.path, self.prediction_type, self.clip_sample)

    def steps_left(self, t: float) -> int:
        """How many steps of this sampler remain from timestep ``t`` on, this one included (1 on the last)."""
        ts = self.timesteps.tolist()
        return len(ts) - ts.index(t)

    def step(self, denoiser: Denoiser, x_t: torch.Tensor, t, t_prev, generator: torch.Generator | None = None,
             state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse update x_t -> x_{t_prev} (t_prev = the path's clean time on the last step); returns (x_prev,
        predicted x_0).

        ``denoiser(x, t)`` gives (x0, eps) and may be called any number of times; ``state`` is a dict that
        lives for one sampling run (history for multistep solvers); noise comes from ``generator``.
        """
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int] | None = None,
        *,
        x_T: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        progress: bool | None = None,
        return_trajectory: bool = False,
        start_step: int = 0,
        on_step: StepHook | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        observe: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | Trajectory:
        """Run the reverse process from noise (``x_T``, or N(0, I) drawn from ``generator``) to x_0.

        ``model_fn(x_t, t)`` gets t of shape (N,) (the path's time tensor: a LongTensor at a discrete path's integer
        timesteps; bind conditions with ``functools.partial``). Sampling starts from ``prior_std * x_T`` at
        ``timesteps[0]``, prior_std the path's (:meth:`~diffexp.paths.GaussianPath.prior_std`: 1 on
        variance-preserving paths and on the flow path at t = 1, sigma_max on EDM's), so ``x_T`` is unit noise on
        every path. ``start_step`` > 0 starts at ``timesteps[start_step]`` with ``x_T`` taken as x itself at that
        time (image-to-image); ``on_step(i, t_prev, x_prev)`` may replace x after the i-th step run (i counts the
        steps run, from 0; t_prev = the path's clean time after the last), e.g. for inpainting. ``jump_n_sample`` > 1
        adds RePaint resampling (:func:`resampling_levels`): x at t is noised back to t' > t by the forward process
        q(x_t' | x_t) (:meth:`~diffexp.paths.GaussianPath.renoised`) and the steps are run again (multistep
        solvers restart their history there). ``observe(i, t, x_t, x0)`` sees each step's input and predicted
        x_0 as it runs (a live view; it changes nothing).
        Returns the final sample, or a :class:`Trajectory` when ``return_trajectory``.
        """
        ts = [t.item() for t in self.timesteps]
        if not 0 <= start_step < len(ts):
            raise ValueError(f"start_step={start_step} must lie in [0, {len(ts)}) (the sampler's steps)")
        if x_T is None:
            if shape is None:
                raise ValueError("sample() needs either shape or x_T")
            x = randn(shape, generator, device or "cpu")
        else:
            x = x_T.to(device) if device is not None else x_T
        scale = self.path.prior_std(ts[0]) if start_step == 0 else 1.0
        if scale != 1.0:
            x = x * scale
        ts = ts[start_step:]
        levels = resampling_levels(len(ts), jump_length, jump_n_sample)
        denoiser = self.denoiser(model_fn)
        state: dict = {}
        traj = Trajectory(sample=x) if return_trajectory else None
        show = self.progress if progress is None else progress
        steps_run = 0
        bar = tqdm(total=len(levels) - 1, desc=type(self).__name__, disable=not show, leave=False)
        for k, k_next in zip(levels, levels[1:]):
            bar.update()
            if k_next < k:  # RePaint: back up to ts[k_next] by the forward process
                x = self.path.renoised(x, ts[k], ts[k_next], randn(x.shape, generator, x.device, x.dtype))
                state = {}
                continue
            t, t_prev = ts[k], ts[k_next] if k_next < len(ts) else self.path.clean_time
            x_prev, x0 = self.step(denoiser, x, t, t_prev, generator=generator, state=state)
            if observe is not None:
                observe(steps_run, t, x, x0)
            if on_step is not None:
                x_prev = on_step(steps_run, t_prev, x_prev)
            steps_run += 1
            if traj is not None:
                traj.timesteps.append(t)
                traj.xs.append(x)
                traj.x0s.append(x0)
            x = x_prev
        bar.close()
        if traj is not None:
            traj.sample, traj.nfe = x, denoiser.nfe
            return traj
        return x


def checked_eta(eta: float) -> float:
    """``sampler.eta``, the share of fresh noise per step: 0 (deterministic) to 1 (as much as the forward process)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"sampler.eta must lie in [0, 1], got {eta!r}")
    return float(eta)


class SpacedSampler(Sampler):
    """A sampler visiting ``steps`` times chosen by ``timestep_spacing`` (leading, trailing, linspace, uniform, karras
    or shifted: :func:`diffexp.samplers.spacing.spaced_timesteps`, with ``rho`` for karras and ``shift`` for
    shifted). Not given: the path's own spacing if it has one (flow and cosine: trailing; EDM: karras), else the
    sampler's ``default_spacing``."""

    default_spacing = "leading"

    def __init__(self, path: GaussianPath, steps: int = 50, timestep_spacing: str | None = None, rho: float = 7.0,
                 shift: float = 3.0, **kwargs):
        super().__init__(path, **kwargs)
        self.steps = steps
        self.timestep_spacing = timestep_spacing or self.path.default_spacing or self.default_spacing
        self.rho, self.shift = rho, shift
        self._timesteps = spaced_timesteps(self.path, steps, self.timestep_spacing, rho=rho, shift=shift)
        self.check_start()

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps
