"""Domain classifiers: small CNNs trained on a built-in dataset, used offline as feature extractors.

Their features give FID/KID under their own names (``fid_digits``, ...), never passed off as
Inception FID. Weights live next to this file and are produced by
``experiments/scripts/train_domain_classifier.py``, which records held-out accuracy.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DOMAIN_CLASSIFIERS = {"digits": {"image_size": 16, "channels": 1, "num_classes": 10},
                      "shapes": {"image_size": 32, "channels": 3, "num_classes": 24}}  # colour x shape


class DomainClassifier(nn.Module):
    """conv-conv-pool-conv-pool-MLP classifier; ``features`` is the penultimate layer (``num_features`` wide).

    Accepts uint8 images (N, C, H, W) in 0..255 or float images in [-1, 1]; any size is resized
    (bilinear, antialiased) to ``image_size`` first.
    """

    def __init__(self, image_size: int = 16, channels: int = 1, num_classes: int = 10, width: int = 32,
                 num_features: int = 128):
        super().__init__()
        self.image_size, self.channels, self.num_classes, self.num_features = image_size, channels, num_classes, num_features
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)
        # features are multiplied by this so that real data have mean |f|^2 / D = 1 (KID's
        # polynomial kernel (x.y/D + 1)^3 assumes features of order one); set by calibrate_feature_scale
        self.register_buffer("feature_scale", torch.tensor(1.0))

    @torch.no_grad()
    def calibrate_feature_scale(self, real_images: torch.Tensor) -> float:
        """Set ``feature_scale`` = 1 / sqrt(mean |f|^2 / D) over ``real_images``; returns it."""
        self.feature_scale.fill_(1.0)
        f = self.features(real_images)
        self.feature_scale.fill_(float((f.pow(2).sum(1).mean() / f.shape[1]).rsqrt()))
        return float(self.feature_scale)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 or float [-1, 1] -> float [-1, 1] at ``image_size``."""
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x.to(next(self.parameters()).device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations times ``feature_scale``: the features FID/KID use."""
        return self.body(self.prepare(images)) * self.feature_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.body(self.prepare(images)))


class DomainFeatures(nn.Module):
    """The penultimate features of a :class:`DomainClassifier`, shaped for torchmetrics' FID/KID."""

    def __init__(self, classifier: DomainClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}_classifier.pt"


def load_domain_classifier(name: str = "digits", device: str | torch.device = "cpu") -> DomainClassifier:
    """The committed classifier for dataset ``name`` in eval mode."""
    if name not in DOMAIN_CLASSIFIERS:
        raise ValueError(f"no domain classifier for {name!r}; available: {sorted(DOMAIN_CLASSIFIERS)}")
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; create it with "
                                f"`python experiments/scripts/train_domain_classifier.py --dataset {name}`")
    model = DomainClassifier(**DOMAIN_CLASSIFIERS[name])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()
