"""The one place where [-1, 1] images become uint8 / [0, 1] / PNG grids, and image files become tensors.

Used by metrics, callbacks, sample.py and the plots in :mod:`diffexp.viz`."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] floats (clamped)."""
    return ((images.detach().float() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, C, H, W), rounding to the nearest level."""
    return (to_unit(images) * 255).round().to(torch.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats (N, C, H, W) -> numpy uint8 (N, H, W, C), the layout of ``samples.npz``."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile [-1, 1] images into one uint8 H x W (x 3) array, ``nrow`` images per row (default: square).

    A 5-D tensor (rows, columns, C, H, W) is a grid already laid out: its rows are kept.
    """
    from torchvision.utils import make_grid as tv_make_grid

    if images.ndim == 5:
        images, nrow = images.flatten(0, 1), images.shape[1]

    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = tv_make_grid(to_unit(images.cpu()), nrow=nrow, padding=padding, pad_value=1.0)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if images.shape[1] == 1 else array


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save a grid of [-1, 1] images as PNG, optionally upscaled by ``scale`` (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def load_image(path: str | Path, size: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """An image file as a float (C, H, W) tensor in [-1, 1], resized (bicubic) to ``size`` x ``size`` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist; pass a PNG/JPEG file")
    try:
        img = Image.open(path).convert("L" if grayscale else "RGB")
    except OSError as e:
        raise ValueError(f"image {str(path)!r} could not be read as an image ({e})") from None
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
