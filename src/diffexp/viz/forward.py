"""The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), seen as frames, grids and histograms."""
from __future__ import annotations

import numpy as np
import torch

from diffexp.paths import DiscretePath
from diffexp.schedules import NoiseSchedule, get_schedule


def as_schedule(schedule: str | NoiseSchedule, num_timesteps: int = 1000) -> NoiseSchedule:
    return get_schedule(schedule, num_timesteps) if isinstance(schedule, str) else schedule


def noised(image: torch.Tensor, schedule: str | NoiseSchedule, timesteps, seed: int = 0) -> torch.Tensor:
    """x_t for each t in ``timesteps`` (F, C, H, W) from one image (C, H, W) in [-1, 1].

    The same noise draw serves every t, so frames differ only by how much signal is left.
    """
    schedule = as_schedule(schedule)
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    bad = t[(t < 0) | (t >= schedule.num_timesteps)]
    if len(bad):
        raise ValueError(f"timesteps {bad.tolist()} outside [0, {schedule.num_timesteps})")
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)).expand(len(t), *image.shape)
    return DiscretePath(schedule).noised(image.float().expand(len(t), *image.shape), t, noise)


def forward_grid_figure(image: torch.Tensor, schedules=("linear", "cosine"), timesteps=(0, 100, 250, 500, 750, 999),
                        seed: int = 0):
    """A figure: one row per schedule, x_t at each of ``timesteps`` (shown clamped to [-1, 1])."""
    import matplotlib.pyplot as plt

    from diffexp.viz.images import show_image

    schedules = [as_schedule(s) for s in schedules]
    fig, axes = plt.subplots(len(schedules), len(timesteps), figsize=(1.6 * len(timesteps), 1.8 * len(schedules)),
                             squeeze=False)
    for row, schedule in enumerate(schedules):
        frames = noised(image, schedule, timesteps, seed)
        for col, t in enumerate(timesteps):
            ax = axes[row, col]
            show_image(ax, frames[col])
            if row == 0:
                ax.set_title(f"t = {t}", fontsize=9)
            if col == 0:
                ax.set_ylabel(schedule.name, fontsize=9)
    fig.tight_layout()
    return fig


def histogram_figure(image: torch.Tensor, schedule: str | NoiseSchedule = "linear",
                     timesteps=(0, 50, 200, 500, 999), seed: int = 0, bins: int = 40):
    """Histograms of x_t's pixel values along t, with the N(0, 1) density they approach."""
    import matplotlib.pyplot as plt

    schedule = as_schedule(schedule)
    frames = noised(image, schedule, timesteps, seed)
    fig, axes = plt.subplots(1, len(timesteps), figsize=(2.4 * len(timesteps), 2.2), sharey=True)
    grid = np.linspace(-4, 4, 200)
    for ax, t, frame in zip(np.atleast_1d(axes), timesteps, frames):
        ax.hist(frame.flatten().numpy(), bins=bins, range=(-4, 4), density=True, color="tab:blue", alpha=0.7)
        ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), color="black", lw=1, label="N(0, 1)")
        abar = schedule.alphas_cumprod[t].item()
        ax.set_title(f"t = {t}, abar = {abar:.3f}", fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"pixel values of x_t ({schedule.name} schedule)", fontsize=10)
    fig.tight_layout()
    return fig


def forward_animation_frames(image: torch.Tensor, schedules=("linear", "cosine"), num_frames: int = 40,
                             seed: int = 0, scale: int = 4) -> list[np.ndarray]:
    """``num_frames`` uint8 frames: per frame, x_t for every schedule side by side, t rising from 0 to T-1."""
    from diffexp.viz.animation import frames_from_images

    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    schedules = [as_schedule(s) for s in schedules]
    T = min(s.num_timesteps for s in schedules)
    ts = np.linspace(0, T - 1, num_frames).round().astype(int).tolist()
    per_schedule = [noised(image, s, ts, seed) for s in schedules]  # each (F, C, H, W)
    batches = [torch.stack([frames[i] for frames in per_schedule]) for i in range(num_frames)]
    return frames_from_images(batches, nrow=len(schedules), scale=scale)
