"""Drawing [-1, 1] images on matplotlib axes (conversions live in :mod:`diffexp.images`)."""
from __future__ import annotations

import torch

from diffexp.images import load_image, make_grid, save_grid, to_unit

__all__ = ["show_image", "load_image", "make_grid", "save_grid"]  # the conversions, for notebooks


def show_image(ax, image: torch.Tensor) -> None:
    """Draw one [-1, 1] image (C, H, W) on a matplotlib axis, grayscale or RGB, without ticks."""
    array = to_unit(image.cpu()).permute(1, 2, 0).numpy()
    ax.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
