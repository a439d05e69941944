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
            f"with internet and place it there (or pass its path: inception_weights=PATH to python -m "
            f"diffexp.evaluate, callbacks.fid.inception_weights=PATH to train.py). Offline, use the domain metrics "
            f"instead (e.g. fid_digits)."
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


DINOV2_ID = "facebook/dinov2-large"  # DINOv2 ViT-L/14, the FD-DINOv2 network of Stein et al. 2023


class DINOv2Features(nn.Module):
    """DINOv2's class token (after the final layer norm): FD-DINOv2's features (Stein et al. 2023, dgm-eval).

    Images are resized to 224x224 (bicubic, antialiased), scaled to [0, 1] and normalised with ImageNet's mean
    and std, as dgm-eval does. ``path``: a local folder with ``config.json`` and safetensors weights, or a hub id
    found in the Hugging Face cache; offline without it, the error names what to download and where.
    """

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, path: str | os.PathLike | None = None, resolution: int = 224):
        super().__init__()
        from transformers import Dinov2Model

        from diffexp.frozen import hub_offline

        source = str(Path(path).expanduser()) if path is not None and Path(path).expanduser().exists() else \
            (path or DINOV2_ID)
        try:
            self.net = Dinov2Model.from_pretrained(source, use_safetensors=True,
                                                   local_files_only=hub_offline() or Path(str(source)).exists())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"DINOv2 weights for fd_dinov2 not found at {source!r} ({type(e).__name__}). Download "
                f"{DINOV2_ID} on a machine with internet (huggingface-cli download {DINOV2_ID}) into the HF cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), or pass dinov2=FOLDER (python -m "
                f"diffexp.evaluate) holding its config.json and model.safetensors") from None
        self.net.requires_grad_(False).eval()
        self.resolution = resolution
        self.num_features = self.net.config.hidden_size
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_rgb(images).to(self.mean.device).float() / 255.0
        x = nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic",
                                      antialias=True, align_corners=False).clamp(0, 1)
        return self.net(pixel_values=(x - self.mean) / self.std).pooler_output


FEATURE_EXTRACTORS = ("inception", "dinov2", *DOMAIN_CLASSIFIERS)


def build_feature_extractor(name: str, device: str | torch.device = "cpu", inception_weights: str | None = None,
                            feature: str = "2048", dinov2: str | None = None) -> nn.Module:
    """``inception`` (needs its weights file), ``dinov2`` (its folder or cached hub id) or a domain classifier
    name such as ``digits``."""
    if name == "inception":
        return InceptionFeatures(feature, inception_weights).to(device)
    if name == "dinov2":
        return DINOv2Features(dinov2).to(device)
    if name in DOMAIN_CLASSIFIERS:
        return DomainFeatures(load_domain_classifier(name, device))
    raise ValueError(f"unknown feature extractor {name!r}; allowed: {list(FEATURE_EXTRACTORS)}")


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of ``images`` in batches, on the CPU, float64."""
    return torch.cat([extractor(images[i:i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)])
