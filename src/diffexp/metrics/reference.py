"""Reference features of a dataset's real images, computed once and cached on disk.

Cache key: (dataset, split, resolution, channels, feature extractor and a fingerprint of its
weights, so retrained extractors never reuse stale features). Files are
``<cache_dir>/<dataset>-<split>-<res>px-<ch>ch-<extractor>-<fingerprint>.pt``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from diffexp.metrics.features import extract_features


def default_cache_dir() -> Path:
    """``$DIFFEXP_CACHE`` or ``~/.cache/diffexp``."""
    return Path(os.environ.get("DIFFEXP_CACHE", Path.home() / ".cache" / "diffexp")).expanduser()


def real_images(datamodule, split: str = "train", max_n: int | None = None) -> torch.Tensor:
    """The real images of ``split`` (``train``/``val``) as float [-1, 1] NCHW, in dataset order."""
    if split not in ("train", "val"):
        raise ValueError(f"reference split must be 'train' or 'val', got {split!r}")
    datamodule.setup("fit")
    dataset = datamodule.train_set if split == "train" else datamodule.val_set
    n = len(dataset) if max_n is None else min(max_n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


def weights_fingerprint(module: nn.Module) -> str:
    """First 10 hex digits of a SHA-1 over the module's parameters and buffers."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


def reference_features(datamodule, extractor: nn.Module, extractor_name: str, split: str = "train",
                       max_n: int | None = None, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Features (N, D) of the real images, from the cache when present (float64, CPU)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    limit = "" if max_n is None else f"-n{max_n}"
    path = cache_dir / (f"{datamodule.name}-{split}-{datamodule.image_size}px-{datamodule.channels}ch-"
                        f"{extractor_name}-{weights_fingerprint(extractor)}{limit}.pt")
    if path.is_file():
        return torch.load(path, weights_only=True)
    features = extract_features(extractor, real_images(datamodule, split, max_n))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(features, tmp)
    tmp.replace(path)  # atomic: concurrent jobs never read a half-written file
    return features
