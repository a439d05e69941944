"""The one image preprocessing of every file-based dataset (folders, webdataset shards, Hugging Face datasets).

Resize the shorter side to ``image_size`` with PIL's bicubic filter (PIL resamples with a support widened by
the downscale factor, i.e. antialiased: the clean-fid convention, Parmar et al. 2022), center-crop to a square,
optionally mirror, then scale to [-1, 1]. Grayscale is 1 channel, everything else RGB.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def open_image_bytes(data: bytes) -> Image.Image:
    """A PIL image decoded from encoded bytes (PNG, JPEG, WebP, ...), pixels loaded (a broken file fails here)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as 8-bit L (``channels`` 1) or RGB: 16/32-bit integer grayscale scaled to 0..255 (not clipped,
    which would turn it white); palette, CMYK and alpha converted by PIL."""
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image.mode.startswith("I"):  # I;16, I;16B, I (32-bit)
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8), "L")
    return image.convert("L" if channels == 1 else "RGB")


def resize_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """The shorter side resized to ``image_size`` (bicubic, antialiased), then the central square."""
    width, height = image.size
    scale = image_size / min(width, height)
    new = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - image_size) // 2, (new[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An L or RGB PIL image as float (C, H, W) in [-1, 1]: x / 127.5 - 1."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy()) / 127.5 - 1.0


def preprocess(image: Image.Image, image_size: int, channels: int, flip: bool = False) -> torch.Tensor:
    """:func:`to_mode`, :func:`resize_center_crop`, a horizontal mirror when ``flip``, :func:`to_tensor`."""
    image = resize_center_crop(to_mode(image, channels), image_size)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(image)
