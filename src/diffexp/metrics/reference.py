"""Reference features of a dataset's real images, computed once and cached on disk.

Cache key: (dataset, split, resolution, channels, feature extractor and a fingerprint of its
weights, so retrained extractors never reuse stale features). Files are
``<cache_dir>/<dataset>-<split>-<res>px-<ch>ch-<extractor>-<fingerprint>.pt``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffexp.cache import cached_tensor, default_cache_dir, weights_fingerprint
from diffexp.metrics.features import extract_features


def real_images(datamodule, split: str = "train", max_n: int | None = None) -> torch.Tensor:
    """The real images of ``split`` (``train``/``val``) as float [-1, 1] NCHW, in dataset order."""
    if split not in ("train", "val"):
        raise ValueError(f"reference split must be 'train' or 'val', got {split!r}")
    dataset = datamodule.dataset(split)
    n = len(dataset) if max_n is None else min(max_n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


def reference_features(datamodule, extractor: nn.Module, extractor_name: str, split: str = "train",
                       max_n: int | None = None, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Features (N, D) of the real images, from the cache when present (float64, CPU)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    limit = "" if max_n is None else f"-n{max_n}"
    name = getattr(datamodule, "reference_key", datamodule.name)  # which files, for file-based data
    path = cache_dir / (f"{name}-{split}-{datamodule.image_size}px-{datamodule.channels}ch-"
                        f"{extractor_name}-{weights_fingerprint(extractor)}{limit}.pt")
    return cached_tensor(path, lambda: extract_features(extractor, real_images(datamodule, split, max_n)))
