"""Denoising grids: what the model sees and predicts along the forward process, and a reverse trajectory."""
from __future__ import annotations

import torch

from diffexp.callbacks.ema import ema_weights
from diffexp.callbacks.images import PeriodicCallback, log_images
from diffexp.diffusion import q_sample


class DenoisingGrid(PeriodicCallback):
    """Every ``every_n_steps`` steps, log two grids (EMA weights, fixed noise):

    Latent models show decoded latents.

    * ``denoising/forward``: for ``num_images`` validation images, a row of x_t at each of
      ``timesteps`` followed by a row of the model's predicted x0 at the same t;
    * ``denoising/reverse``: for ``num_trajectories`` samples, a row of x_t along the reverse
      process (x_T ... x_0, ``frames`` columns) followed by a row of the predicted x0 there.
    """

    needs_sampling = True

    def __init__(self, every_n_steps: int = 1000, num_images: int = 4,
                 timesteps: tuple[int, ...] = (0, 100, 250, 500, 750, 999), num_trajectories: int = 2,
                 frames: int = 8, seed: int = 0, sampler=None):
        if every_n_steps <= 0 or num_images < 0 or num_trajectories < 0 or frames < 2:
            raise ValueError("callbacks.denoising_grid: every_n_steps > 0, num_images >= 0, num_trajectories >= 0 "
                             "and frames >= 2 are required")
        self.every_n_steps, self.num_images, self.timesteps = every_n_steps, num_images, list(timesteps)
        self.num_trajectories, self.frames, self.seed, self.sampler = num_trajectories, frames, seed, sampler

    def forward_grid(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        """(2 * num_images * len(timesteps)) images: per input, a row of x_t then a row of x0_hat."""
        T = pl_module.schedule.num_timesteps
        bad = [t for t in self.timesteps if not 0 <= t < T]
        if bad:
            raise ValueError(f"callbacks.denoising_grid.timesteps {bad} outside [0, {T})")
        generator = torch.Generator().manual_seed(self.seed)
        rows = []
        for x0 in pl_module.to_model_space(images.to(pl_module.device)):
            x0 = x0[None].expand(len(self.timesteps), *x0.shape)
            t = torch.tensor(self.timesteps, device=pl_module.device)
            noise = torch.randn(x0.shape, generator=generator).to(pl_module.device)
            x_t = q_sample(x0, t, noise, pl_module.alphas_cumprod)
            rows += [pl_module.to_images(x_t).clamp(-1, 1), pl_module.to_images(pl_module.predict_x0(x_t, t)).clamp(-1, 1)]
        return torch.cat(rows)

    def reverse_grid(self, pl_module) -> torch.Tensor:
        noise = torch.randn((self.num_trajectories, *pl_module.sample_shape),
                           generator=torch.Generator().manual_seed(self.seed + 1))
        traj = pl_module.sample(self.num_trajectories, sampler=self.sampler, x_T=noise.to(pl_module.device),
                                progress=False, return_trajectory=True,
                                **pl_module.sampling_conditions(self.num_trajectories))
        pick = torch.linspace(0, len(traj.xs) - 1, self.frames - 1).round().long().tolist()
        rows = []
        for i in range(self.num_trajectories):
            rows.append(torch.stack([traj.xs[k][i] for k in pick] + [traj.sample[i]]).clamp(-1, 1))
            rows.append(torch.stack([traj.x0s[k][i] for k in pick] + [traj.sample[i]]).clamp(-1, 1))
        return torch.cat(rows)

    def make(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        with ema_weights(trainer, pl_module):
            if self.num_images:
                dataset = trainer.datamodule.val_set
                images = torch.stack([dataset[i]["image"] for i in range(min(self.num_images, len(dataset)))])
                log_images(trainer, "denoising/forward", self.forward_grid(pl_module, images), nrow=len(self.timesteps))
            if self.num_trajectories:
                log_images(trainer, "denoising/reverse", self.reverse_grid(pl_module), nrow=self.frames)
