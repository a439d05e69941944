"""The images a diffusion model shows of itself during training (``log_images``): monitoring samples, the
forward process and the predicted x_0 at several noise levels, and reverse trajectories."""
from __future__ import annotations

import torch


@torch.no_grad()
def log_images(model, batch: dict | None, samples: int = 0, timesteps=(), trajectories: int = 0,
               frames: int = 8, seed: int = 0, sampler=None, **unused) -> dict[str, torch.Tensor]:
    """Images in [-1, 1]; a 5-D value (rows, columns, C, H, W) is a laid-out grid. Options a callback does not set
    are off; options meant for other modules are ignored.

    - ``samples``: that many monitoring samples (``model.monitoring_inputs`` with ``seed``);
    - ``timesteps`` with ``batch``: per image, a row of x_t at each time (:func:`grid_times`) and a row of predicted
      x0 there (noise from ``seed``);
    - ``trajectories``: per sample, a row of x_t along the reverse process (``frames`` columns, x_T ... x_0)
      and a row of the x0 predicted there (noise from ``seed + 1``).
    """
    out = {}
    if samples:
        x_T, cond = model.monitoring_inputs(samples, seed)
        out["samples"] = model.sample(samples, sampler=sampler, x_T=x_T.to(model.device), progress=False, **cond)
    if timesteps and batch is not None:
        out["denoising/forward"] = forward_grid(model, batch["image"], list(timesteps), seed)
    if trajectories:
        out["denoising/reverse"] = reverse_grid(model, trajectories, frames, seed + 1, sampler)
    return out


GRID_STEPS = 1000  # a continuous path's times are read as timesteps of a grid of this many


def grid_times(path, timesteps: list[int]) -> torch.Tensor:
    """The times of ``timesteps``: a discrete path's own integer timesteps (in [0, T)); on a continuous path, steps
    of a 1000-step grid over its trained range (0 = t_min, 999 = t_max)."""
    T = path.num_timesteps or GRID_STEPS
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise ValueError(f"callbacks.denoising_grid.timesteps {bad} outside [0, {T})")
    if path.num_timesteps is not None:
        return torch.tensor(timesteps)
    return torch.tensor([path.grid_time(t / (GRID_STEPS - 1)) for t in timesteps], dtype=torch.float32)


def forward_grid(model, images: torch.Tensor, timesteps: list[int], seed: int) -> torch.Tensor:
    """(2 * len(images), len(timesteps), C, H, W): per image a row of x_t, then a row of x0_hat."""
    t = grid_times(model.path, timesteps).to(model.device)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for x0 in model.space.encode(images.to(model.device)):
        x0 = x0[None].expand(len(timesteps), *x0.shape)
        noise = torch.randn(x0.shape, generator=generator).to(model.device)
        x_t = model.path.noised(x0, t, noise)
        rows += [model.space.decode(x_t).clamp(-1, 1), model.space.decode(model.predict_x0(x_t, t)).clamp(-1, 1)]
    return torch.stack(rows)


def reverse_grid(model, n: int, frames: int, seed: int, sampler=None) -> torch.Tensor:
    """(2 * n, frames, C, H, W): per monitoring sample, x_t along the reverse process then the predicted x0."""
    x_T, cond = model.monitoring_inputs(n, seed)
    traj = model.sample(n, sampler=sampler, x_T=x_T.to(model.device), progress=False, return_trajectory=True, **cond)
    pick = torch.linspace(0, len(traj.xs) - 1, frames - 1).round().long().tolist()
    rows = []
    for i in range(n):
        rows.append(torch.stack([traj.xs[k][i] for k in pick] + [traj.sample[i]]).clamp(-1, 1))
        rows.append(torch.stack([traj.x0s[k][i] for k in pick] + [traj.sample[i]]).clamp(-1, 1))
    return torch.stack(rows)
