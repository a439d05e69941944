"""What every sampler shares: the reverse loop, noise from explicit generators, trajectories."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from diffexp.diffusion import check_prediction_type, prediction_to_x0_eps
from diffexp.schedules import NoiseSchedule

ModelFn = Callable[..., torch.Tensor]  # model_fn(x_t, t, **cond) -> prediction


@dataclass
class Trajectory:
    """The result of a sampling run with the intermediate states kept.

    ``xs[i]`` is x at ``timesteps[i]`` (xs[0] is x_T) and ``x0s[i]`` the x_0 predicted there;
    ``sample`` is the final x_0.
    """

    sample: torch.Tensor
    timesteps: list[int] = field(default_factory=list)
    xs: list[torch.Tensor] = field(default_factory=list)
    x0s: list[torch.Tensor] = field(default_factory=list)


def randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's device keeps samples identical across devices for a given seed.
    """
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


class Sampler:
    """Base class: subclasses define ``timesteps`` and ``step``.

    Args:
        schedule: the training noise schedule.
        prediction_type: what ``model_fn`` predicts (``epsilon``, ``sample``, ``v_prediction``).
        clip_sample: clamp the predicted x_0 to [-1, 1] before each update.
        progress: show a progress bar by default.
    """

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
        """Descending integer timesteps visited by the sampler."""
        raise NotImplementedError

    def alpha_bar(self, t: int) -> float:
        """abar_t, with abar_{-1} = 1 (the clean data before t = 0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def predict_x0_eps(self, model_output, x_t, t: int):
        """(x_0, eps) implied by the model output at integer timestep t, x_0 optionally clipped."""
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0, eps = prediction_to_x0_eps(model_output, x_t, t_batch, self.alphas_cumprod, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
            abar = self.alpha_bar(t)
            eps = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        return x0, eps

    def step(self, model_output, t: int, t_prev: int, x_t, generator=None):
        """One reverse update x_t -> x_{t_prev}; returns (x_prev, predicted x_0)."""
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
        model_kwargs: dict | None = None,
    ) -> torch.Tensor | Trajectory:
        """Run the reverse process from x_T (given, or N(0, I) drawn from ``generator``) to x_0.

        ``model_fn(x_t, t, **model_kwargs)`` gets a LongTensor t of shape (N,).
        Returns the final sample, or a :class:`Trajectory` when ``return_trajectory``.
        """
        if x_T is None:
            if shape is None:
                raise ValueError("sample() needs either shape or x_T")
            x = randn(shape, generator, device or "cpu")
        else:
            x = x_T.to(device) if device is not None else x_T
        model_kwargs = model_kwargs or {}
        ts = [int(t) for t in self.timesteps]
        traj = Trajectory(sample=x) if return_trajectory else None
        show = self.progress if progress is None else progress
        for i, t in enumerate(tqdm(ts, desc=type(self).__name__, disable=not show, leave=False)):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            model_output = model_fn(x, t_batch, **model_kwargs)
            x_prev, x0 = self.step(model_output, t, t_prev, x, generator=generator)
            if traj is not None:
                traj.timesteps.append(t)
                traj.xs.append(x)
                traj.x0s.append(x0)
            x = x_prev
        if traj is not None:
            traj.sample = x
            return traj
        return x
