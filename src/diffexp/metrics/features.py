"""Feature extractors for FID/KID/IS: torch-fidelity's Inception-v3 or a committed domain classifier.

Every extractor takes uint8 images (N, C, H, W) in 0..255 or float images in [-1, 1] and is a
``torch.nn.Module`` with ``num_features``, so torchmetrics' FID/KID/IS accept it as ``feature=``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from diffexp.metrics.domain import DOMAIN_CLASSIFIERS, DomainFeatures, load_domain_classifier
from diffexp.images import to_uint8

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's converted TF Inception-v3
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float [-1, 1] (N, 1 or 3, H, W) -> uint8 (N, 3, H, W); grayscale is repeated."""
    if images.dtype != torch.uint8:
        images = to_uint8(images.float())
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
    return images


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception-v3 weights file: ``path`` if given, else torch's hub cache; a clear error if absent."""
    if path is not None:
        candidate = Path(path).expanduser()
    else:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights for FID/KID/IS not found at {candidate}. Download {INCEPTION_URL} on a machine "
            f"with internet and place it there (or pass metrics.inception_weights=PATH). Offline, use the domain "
            f"metrics instead (e.g. fid_digits)."
        )
    return candidate


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 (the standard FID network): ``"2048"`` pool features or ``"logits_unbiased"``.

    Images are converted once to uint8 RGB; torch-fidelity resizes them to 299x299 the way
    TensorFlow 1.x did, so figures are comparable with the published FID implementation.
    """

    def __init__(self, feature: str = "2048", weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        from diffexp.checkpoints import load_file

        self.feature = feature
        path = inception_weights_path(weights_path)
        # torch-fidelity unpickles the file with weights_only=False: read it safely first, so a file holding
        # anything but tensors is refused before it gets there
        load_file(path, option="metrics.inception_weights", legacy_format=True)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", [feature], feature_extractor_weights_path=str(path))
        self.num_features = 1008 if feature == "logits_unbiased" else int(feature)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net(to_uint8_rgb(images).to(device))[0]


class PassThrough(nn.Module):
    """Identity "extractor" so torchmetrics can be fed precomputed (e.g. cached reference) features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


FEATURE_EXTRACTORS = ("inception", *DOMAIN_CLASSIFIERS)


def build_feature_extractor(name: str, device: str | torch.device = "cpu", inception_weights: str | None = None,
                            feature: str = "2048") -> nn.Module:
    """``inception`` (needs its weights file) or a domain classifier name such as ``digits``."""
    if name == "inception":
        return InceptionFeatures(feature, inception_weights).to(device)
    if name in DOMAIN_CLASSIFIERS:
        return DomainFeatures(load_domain_classifier(name, device))
    raise ValueError(f"unknown feature extractor {name!r}; allowed: {list(FEATURE_EXTRACTORS)}")


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of ``images`` in batches, on the CPU, float64."""
    return torch.cat([extractor(images[i:i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)])
