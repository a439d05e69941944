"""Animations: a list of frames to GIF (pillow) or MP4 (imageio, optional)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffexp.errors import MissingPackageError
from diffexp.images import make_grid


def figure_to_array(fig) -> np.ndarray:
    """A matplotlib figure rendered to a uint8 (H, W, 3) array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def frames_from_images(batches, nrow: int | None = None, scale: int = 1) -> list[np.ndarray]:
    """One uint8 frame per tensor batch (each tiled with :func:`make_grid`), upscaled by ``scale``."""
    frames = []
    for images in batches:
        grid = make_grid(images, nrow)
        if scale > 1:
            grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
        frames.append(grid)
    return frames


def save_animation(frames: list[np.ndarray], path: str | Path, fps: float = 10.0, loop: bool = True) -> Path:
    """Write uint8 frames (H, W) or (H, W, 3) as ``.gif`` (pillow) or ``.mp4`` (imageio + ffmpeg)."""
    path = Path(path)
    if not frames:
        raise ValueError("an animation needs at least one frame")
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"animation path must end in .gif or .mp4, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0 if loop else 1)
    else:
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise MissingPackageError("MP4 output needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg); "
                              "or write a .gif") from None
        imageio.mimsave(path, frames, fps=fps)
    return path
