"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real data, offline."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffexp.data.base import ImageDataModule, TensorImageDataset, split_indices
from diffexp.registry import register_part

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits_tensor(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float images in [-1, 1] of shape (1797, 1, S, S) (antialiased bilinear resize) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # pixel values 0..16
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
    return images * 2 - 1, torch.tensor(bunch.target, dtype=torch.long)


@register_part
class DigitsDataModule(ImageDataModule):
    """Digits resized to ``image_size`` with a fixed random train/val split."""

    name = "digits"
    num_classes = 10

    def __init__(self, image_size: int = 16, batch_size: int = 128, val_fraction: float = 0.1, num_workers: int = 0,
                 seed: int = 0, channels: int = 1):
        if channels != 1:
            raise ValueError(f"data=digits is grayscale: data.channels must be 1, got {channels}")
        super().__init__(image_size=image_size, channels=1, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.val_fraction = val_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensor(self.image_size)
        train_idx, val_idx = split_indices(len(labels), self.val_fraction, self.seed)
        captions = [f"a handwritten digit {DIGIT_NAMES[int(y)]}" for y in labels]
        self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], [captions[i] for i in train_idx])
        self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], [captions[i] for i in val_idx])
