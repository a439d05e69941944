"""Image logging: one helper for every logger, and the sample-grid callback."""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffexp.callbacks.ema import ema_weights
from diffexp.viz.images import make_grid, save_grid


@rank_zero_only
def log_images(trainer, key: str, images: torch.Tensor, nrow: int | None = None, scale: int = 4) -> Path:
    """Save ``images`` ([-1, 1]) as a PNG grid under RUN/images/ and send it to every active logger."""
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
    """Calls ``make(trainer, pl_module)`` every ``every_n_steps`` optimizer steps and once more at the end."""

    every_n_steps: int

    def make(self, trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.make(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step % self.every_n_steps != 0:
            self.make(trainer, pl_module)


class SampleGrid(PeriodicCallback):
    """Every ``every_n_steps`` optimizer steps (and at the end), sample a grid from fixed noise.

    The noise comes from ``seed``, so the same cell shows the same starting point across time and runs.
    Sampling uses the EMA weights when the EMA callback is active.
    """

    needs_sampling = True

    def __init__(self, every_n_steps: int = 500, n: int = 64, seed: int = 0, sampler=None, nrow: int | None = None):
        if every_n_steps <= 0 or n <= 0:
            raise ValueError("callbacks.sample_grid: every_n_steps and n must be positive")
        self.every_n_steps, self.n, self.seed, self.sampler, self.nrow = every_n_steps, n, seed, sampler, nrow
        self.last_path: Path | None = None

    def make(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        noise = torch.randn((self.n, *pl_module.sample_shape), generator=torch.Generator().manual_seed(self.seed))
        with ema_weights(trainer, pl_module):
            images = pl_module.sample(self.n, sampler=self.sampler, x_T=noise.to(pl_module.device), progress=False,
                                      **pl_module.sampling_conditions(self.n))
        self.last_path = log_images(trainer, "samples", images, nrow=self.nrow)
