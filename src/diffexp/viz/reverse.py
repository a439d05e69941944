"""The reverse process: sampler trajectories side by side, and quality against the number of steps."""
from __future__ import annotations

import numpy as np

from diffexp.samplers import Sampler, Trajectory, fixed_noise


def trajectories(model, samplers: dict[str, Sampler], n: int = 2, seed: int = 0, **cond) -> dict[str, Trajectory]:
    """One :class:`Trajectory` per named sampler, all from the same x_T (drawn from ``seed``).

    ``model`` is a diffusion LightningModule (``model.sample``); ``cond``: captions or class_labels.
    """
    x_T = fixed_noise(n, model.sample_shape, seed).to(model.device)
    return {name: model.sample(n, sampler=s, x_T=x_T, progress=False, return_trajectory=True, **cond)
            for name, s in samplers.items()}


def pick_frames(traj: Trajectory, frames: int) -> list[int]:
    """``frames`` indices into the trajectory, evenly spaced from x_T to the last step."""
    return np.linspace(0, len(traj.xs) - 1, frames).round().astype(int).tolist()


def trajectory_figure(trajs: dict[str, Trajectory], frames: int = 8, index: int = 0, show_x0: bool = True):
    """Rows per sampler: x_t along the reverse process and (``show_x0``) the predicted x_0 at the same steps,
    for sample ``index`` of each trajectory; the last column is the final sample."""
    import matplotlib.pyplot as plt

    from diffexp.viz.images import show_image

    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    rows = []
    for name, traj in trajs.items():
        pick = pick_frames(traj, frames)
        rows.append((f"{name}\nx_t", [traj.xs[k][index] for k in pick], [traj.timesteps[k] for k in pick]))
        if show_x0:
            rows.append((f"{name}\npredicted x_0", [traj.x0s[k][index] for k in pick], [traj.timesteps[k] for k in pick]))
    fig, axes = plt.subplots(len(rows), frames + 1, figsize=(1.5 * (frames + 1), 1.6 * len(rows)), squeeze=False)
    for r, (label, images, ts) in enumerate(rows):
        final = list(trajs.values())[r // (2 if show_x0 else 1)].sample[index]
        for c, (image, t) in enumerate(zip(images + [final], ts + [None])):
            ax = axes[r, c]
            show_image(ax, image)
            ax.set_title("sample" if t is None else f"t={t}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return fig


def quality_vs_steps_figure(rows: list[dict], metric: str, x: str = "steps"):
    """Line plot of ``metric`` against ``x`` (e.g. sampler steps), one line per ``row["sampler"]``;
    ``rows`` like ``[{"sampler": "ddim", "steps": 10, "fid_digits": 1.2}, ...]``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r[x], r[metric]) for r in rows if r["sampler"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel(x), ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    return fig
