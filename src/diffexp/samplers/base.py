"""What every sampler shares: one loop contract, a model wrapper that counts evaluations, trajectories.

A sampler implements :meth:`Sampler.step`, which receives a :class:`Denoiser` and may call it as often
as it needs (Heun: twice) and keep what it likes in a per-run ``state`` dict (multistep solvers: the
history of model outputs). The loop in :meth:`Sampler.sample` is the same for all samplers; it can start
at an intermediate step from a given x_t (image-to-image) and lets a hook replace part of x after each
step (inpainting).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffexp.diffusion import check_prediction_type, prediction_to_x0_eps, x0_eps_from_prediction
from diffexp.samplers.spacing import spaced_timesteps
from diffexp.schedules import NoiseSchedule, alpha_bar_at

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
    """``model_fn`` as samplers see it: (x_t, t) -> (x0, eps), counting model evaluations in ``nfe``.

    ``t`` is a training timestep: an integer in [0, T), or a float between two of them. A float t is
    passed to the net as a float tensor (the sinusoidal time embedding is defined for any real t) and
    alpha-bar there comes from :func:`diffexp.schedules.alpha_bar_at` (log-sigma interpolation).
    ``clip_sample`` clamps x0 to [-1, 1] and recomputes eps from it.
    """

    def __init__(self, model_fn: ModelFn, alphas_cumprod: torch.Tensor, prediction_type: str,
                 clip_sample: bool = False):
        self.model_fn, self.alphas_cumprod = model_fn, alphas_cumprod
        self.prediction_type, self.clip_sample = prediction_type, clip_sample
        self.nfe = 0
        self._alphas_device: torch.Tensor | None = None

    def alphas_on(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod on ``device``, copied once per sampling run (a copy per step would wait for the GPU)."""
        if self._alphas_device is None or self._alphas_device.device != device:
            self._alphas_device = self.alphas_cumprod.to(device)
        return self._alphas_device

    def alpha_bar(self, t: float) -> float:
        """abar_t, with abar_{-1} = 1 (the clean data before t = 0)."""
        if t < 0:
            return 1.0
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        return float(alpha_bar_at(self.alphas_cumprod, t))

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)): x_t = alpha_t x_0 + sigma_t eps."""
        abar = self.alpha_bar(t)
        return abar**0.5, (1 - abar) ** 0.5

    def log_snr_half(self, t: float) -> float:
        """lambda_t = log(alpha_t / sigma_t), half the log-SNR (Lu et al. 2022): +inf at t = -1 (clean data),
        -inf where abar_t = 0 (zero terminal SNR)."""
        abar = self.alpha_bar(t)
        if abar >= 1:
            return math.inf
        if abar <= 0:
            return -math.inf
        return 0.5 * math.log(abar / (1 - abar))

    def sigma(self, t: float) -> float:
        """Karras et al. (2022)'s sigma_t = sqrt((1 - abar_t) / abar_t): x_t / alpha_t = x_0 + sigma_t eps;
        0 at t = -1, inf where abar_t = 0."""
        abar = self.alpha_bar(t)
        return math.inf if abar <= 0 else ((1 - abar) / abar) ** 0.5

    def model_output(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The raw prediction of the model at (x_t, t): one model evaluation."""
        integer = float(t).is_integer()
        t_batch = torch.full((x_t.shape[0],), int(t) if integer else float(t),
                             dtype=torch.long if integer else torch.float32, device=x_t.device)
        self.nfe += 1
        return self.model_fn(x_t, t_batch)

    def x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: float):
        """(x_0, eps) implied by ``model_output`` at t, x_0 optionally clipped."""
        if float(t).is_integer():
            t_batch = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
            x0, eps = prediction_to_x0_eps(model_output, x_t, t_batch, self.alphas_on(x_t.device), self.prediction_type)
        else:
            abar = torch.tensor(self.alpha_bar(t), dtype=x_t.dtype, device=x_t.device)
            x0, eps = x0_eps_from_prediction(model_output, x_t, abar, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
            abar = self.alpha_bar(t)
            eps = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        return x0, eps

    def __call__(self, x_t: torch.Tensor, t: float):
        """(x_0, eps) predicted at (x_t, t): one model evaluation."""
        return self.x0_eps(self.model_output(x_t, t), x_t, t)


class Sampler:
    """Base class: subclasses define ``timesteps`` and ``step``.

    Args:
        schedule: the training noise schedule.
        prediction_type: what ``model_fn`` predicts (``epsilon``, ``sample``, ``v_prediction``).
        clip_sample: clamp the predicted x_0 to [-1, 1] before each update.
        progress: show a progress bar by default.
    """

    #: model evaluations per step (:meth:`nfe` = this x the number of steps unless a subclass says otherwise)
    evaluations_per_step = 1
    #: options :meth:`with_options` may change (plain settings; the rest is derived in the constructor)
    adjustable = ("clip_sample", "progress")

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        progress: bool = True,
    ):
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.clip_sample = clip_sample
        self.progress = progress
        self.alphas_cumprod = schedule.alphas_cumprod  # float64
        if prediction_type == "epsilon" and float(self.alphas_cumprod[-1]) == 0.0:
            raise ValueError(
                "a zero-terminal-SNR schedule (abar_{T-1} = 0) cannot recover x_0 from an epsilon prediction; "
                "use prediction_type=v_prediction or sample"
            )

    @property
    def timesteps(self) -> torch.Tensor:
        """Descending timesteps visited by the sampler (integers in [0, T), or floats between them)."""
        raise NotImplementedError

    def nfe(self, start_step: int = 0, jump_length: int = 10, jump_n_sample: int = 1) -> int:
        """Model evaluations of a run from ``timesteps[start_step]`` (what :attr:`Trajectory.nfe` reports), with
        RePaint resampling (:func:`resampling_levels`) when ``jump_n_sample`` > 1."""
        levels = resampling_levels(len(self.timesteps) - start_step, jump_length, jump_n_sample)
        return self.evaluations_per_step * sum(b > a for a, b in zip(levels, levels[1:]))

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
        """``model_fn`` wrapped for :meth:`step` with this sampler's schedule, prediction type and clipping."""
        return Denoiser(model_fn, self.alphas_cumprod, self.prediction_type, self.clip_sample)

    def steps_left(self, t: float) -> int:
        """How many steps of this sampler remain from timestep ``t`` on, this one included (1 on the last)."""
        ts = self.timesteps.tolist()
        return len(ts) - ts.index(t)

    def step(self, denoiser: Denoiser, x_t: torch.Tensor, t, t_prev, generator: torch.Generator | None = None,
             state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse update x_t -> x_{t_prev} (t_prev = -1 on the last step); returns (x_prev, predicted x_0).

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
        """Run the reverse process from x_T (given, or N(0, I) drawn from ``generator``) to x_0.

        ``model_fn(x_t, t)`` gets t of shape (N,) (LongTensor at integer timesteps; bind conditions with
        ``functools.partial``). ``start_step`` > 0 starts at ``timesteps[start_step]`` with ``x_T`` taken as x
        at that time (image-to-image); ``on_step(i, t_prev, x_prev)`` may replace x after the i-th step run
        (i counts the steps run, from 0; t_prev = -1 after the last), e.g. for inpainting. ``jump_n_sample`` > 1
        adds RePaint resampling (:func:`resampling_levels`): x at t is noised back to t' > t by
        q(x_t' | x_t) = N(sqrt(abar_t' / abar_t) x_t, (1 - abar_t' / abar_t) I) and the steps are run again
        (multistep solvers restart their history there). ``observe(i, t, x_t, x0)`` sees each step's input and
        predicted x_0 as it runs (a live view; it changes nothing).
        Returns the final sample, or a :class:`Trajectory` when ``return_trajectory``.
        """
        if x_T is None:
            if shape is None:
                raise ValueError("sample() needs either shape or x_T")
            x = randn(shape, generator, device or "cpu")
        else:
            x = x_T.to(device) if device is not None else x_T
        ts = [t.item() for t in self.timesteps]
        if not 0 <= start_step < len(ts):
            raise ValueError(f"start_step={start_step} must lie in [0, {len(ts)}) (the sampler's steps)")
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
                ratio = denoiser.alpha_bar(ts[k_next]) / denoiser.alpha_bar(ts[k])
                x = ratio**0.5 * x + (1 - ratio) ** 0.5 * randn(x.shape, generator, x.device, x.dtype)
                state = {}
                continue
            t, t_prev = ts[k], ts[k_next] if k_next < len(ts) else -1
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
    """A sampler visiting ``steps`` timesteps chosen by ``timestep_spacing`` (leading, trailing, linspace or
    karras: :func:`diffexp.samplers.spacing.spaced_timesteps`); ``default_spacing`` when not given."""

    default_spacing = "leading"

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, timestep_spacing: str | None = None, **kwargs):
        super().__init__(schedule, **kwargs)
        self.steps = steps
        self.timestep_spacing = timestep_spacing or self.default_spacing
        self._timesteps = spaced_timesteps(schedule.num_timesteps, steps, self.timestep_spacing, self.alphas_cumprod)

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps
