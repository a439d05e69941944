"""Periodic callbacks and image logging: the module draws its own images (``log_images``), these send them on."""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffexp.callbacks.ema import ema_weights
from diffexp.images import make_grid, save_grid


@rank_zero_only
def log_images(trainer, key: str, images: torch.Tensor, nrow: int | None = None, scale: int = 4) -> Path:
    """Save ``images`` ([-1, 1]; 4-D, or 5-D rows x columns) as a PNG grid under RUN/images/ and send it to every
    active logger."""
    step = trainer.global_step
    path = save_grid(images, Path(trainer.default_root_dir) / "images" / f"{key.replace('/', '_')}_step{step:06d}.png",
                     nrow=nrow, scale=scale)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            grid = make_grid(images, nrow)
            logger.experiment.add_image(key, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")
    return path


class PeriodicCallback(Callback):
    """Calls ``make(trainer, pl_module)`` every ``every_n_steps`` optimizer steps and, with ``at_end``, once more
    at the end of training unless the last step was one of them."""

    def __init__(self, every_n_steps: int, at_end: bool = True):
        if not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"{type(self).__name__}: every_n_steps must be a positive integer (e.g. eval_every=500), "
                             f"got {every_n_steps!r}")
        self.every_n_steps, self.at_end = every_n_steps, at_end

    def make(self, trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.make(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step % self.every_n_steps != 0:
            self.make(trainer, pl_module)


class ImageLogger(PeriodicCallback):
    """Every ``every_n_steps`` steps (and at the end) log the grids of ``pl_module.log_images(batch, seed=...,
    **options)``, with the EMA weights when the EMA callback is active; ``batch`` holds the first
    ``num_images`` validation images (None when 0). Rank 0 only."""

    def __init__(self, every_n_steps: int = 1000, num_images: int = 0, seed: int = 0, nrow: int | None = None,
                 **options):
        super().__init__(every_n_steps)
        if num_images < 0:
            raise ValueError(f"{type(self).__name__}: num_images must be >= 0, got {num_images}")
        self.num_images, self.seed, self.nrow, self.options = num_images, seed, nrow, options
        self.last_paths: dict[str, Path] = {}

    def make(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        batch = None
        if self.num_images:
            dataset = trainer.datamodule.dataset("val")
            items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
            if items and "image" in items[0]:  # encoded latents (latents=DIR) carry no images
                batch = {"image": torch.stack([item["image"] for item in items])}
        with ema_weights(trainer, pl_module):
            grids = pl_module.log_images(batch, seed=self.seed, **self.options)
        for key, images in grids.items():
            self.last_paths[key] = log_images(trainer, key, images, nrow=self.nrow)


class SampleGrid(ImageLogger):
    """Every ``every_n_steps`` optimizer steps (and at the end), ``n`` samples from fixed noise (``seed``) and
    fixed monitoring conditions, so the same cell shows the same starting point across time and runs."""

    def __init__(self, every_n_steps: int = 500, n: int = 64, seed: int = 0, sampler=None, nrow: int | None = None):
        if n <= 0:
            raise ValueError(f"callbacks.sample_grid.n must be positive, got {n}")
        super().__init__(every_n_steps, seed=seed, nrow=nrow, samples=n, sampler=sampler)

    @property
    def last_path(self) -> Path | None:
        return self.last_paths.get("samples")


class DenoisingGrid(ImageLogger):
    """Every ``every_n_steps`` steps, two grids (EMA weights, fixed noise; latent models show decoded latents):

    * ``denoising/forward``: for ``num_images`` validation images, a row of x_t at each of ``timesteps``
      followed by a row of the model's predicted x0 at the same t;
    * ``denoising/reverse``: for ``num_trajectories`` samples, a row of x_t along the reverse process
      (x_T ... x_0, ``frames`` columns) followed by a row of the predicted x0 there.
    """

    def __init__(self, every_n_steps: int = 1000, num_images: int = 4,
                 timesteps: tuple[int, ...] = (0, 100, 250, 500, 750, 999), num_trajectories: int = 2,
                 frames: int = 8, seed: int = 0, sampler=None):
        if num_trajectories < 0 or frames < 2:
            raise ValueError("callbacks.denoising_grid: num_trajectories >= 0 and frames >= 2 are required")
        super().__init__(every_n_steps, num_images=num_images, seed=seed, timesteps=list(timesteps),
                         trajectories=num_trajectories, frames=frames, sampler=sampler)
