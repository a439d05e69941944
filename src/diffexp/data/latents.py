"""Pre-encoded latents: encode a dataset once with a frozen autoencoder and cache the result on disk."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffexp.cache import cached_tensor, default_cache_dir, tensor_fingerprint, weights_fingerprint


class LatentDataset(Dataset):
    """``dataset``'s items with ``"latent"`` (the raw, unscaled latent of the item's image) added."""

    def __init__(self, dataset: Dataset, latents: torch.Tensor):
        if len(dataset) != len(latents):
            raise ValueError(f"{len(latents)} latents for a dataset of {len(dataset)} items")
        self.dataset, self.latents = dataset, latents
        self.captions = getattr(dataset, "captions", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "latent": self.latents[i]}


@torch.no_grad()
def encode_dataset(dataset: Dataset, autoencoder, device: torch.device | str = "cpu", batch_size: int = 256,
                   cache_dir: str | Path | None = None) -> torch.Tensor:
    """Raw latents (N, c, h, w) of every image in ``dataset``, in order, cached under
    ``<cache_dir>/latents/<images fingerprint>-<autoencoder fingerprint>.pt``."""
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "latents" / f"{tensor_fingerprint(images)}-{weights_fingerprint(autoencoder)}.pt"

    def encode():
        chunks = [autoencoder.encode_raw(chunk.to(device)).cpu() for chunk in images.split(batch_size)]
        return torch.cat(chunks)

    return cached_tensor(path, encode)
