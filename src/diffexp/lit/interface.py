"""The methods callbacks and scripts may call on a diffexp module: declared here, implemented by
:class:`diffexp.lit.DiffusionModel` (both) and :class:`diffexp.lit.VAETraining` (images only)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageModule(Protocol):
    def log_images(self, batch: dict | None, **options) -> dict[str, torch.Tensor]:
        """Named images in [-1, 1] that show what the module does (4-D, or 5-D rows x columns); options a
        module does not know are ignored."""


@runtime_checkable
class SamplingModule(ImageModule, Protocol):
    def sample(self, n: int, sampler=None, generator=None, x_T=None, progress=None, return_trajectory=False,
               guidance_scale=None, guidance_rescale=None, guider=None, **conditions):
        """``n`` images in [-1, 1] (or a trajectory)."""

    def monitoring_inputs(self, n: int, seed: int, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(x_T, conditions) of the fixed monitoring samples ``indices`` of ``n``."""
