"""Pre-encoded latents (``cache_latents=true``): a datamodule wrapper that encodes its data once with a frozen
autoencoder and caches the raw latents on disk."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffexp.cache import cached_tensor, default_cache_dir, tensor_fingerprint, weights_fingerprint
from diffexp.data.base import ImageDataModule


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

    def batch(self, indices: list[int]) -> dict | list[dict]:
        """A batch by indexing (see :meth:`diffexp.data.TensorImageDataset.batch`) when the inner dataset can;
        else the items (collated as usual)."""
        if not hasattr(self.dataset, "batch"):
            return [self[i] for i in indices]
        batch = self.dataset.batch(indices)
        return {**batch, "latent": self.latents[torch.as_tensor(indices, device=self.latents.device)]}

    @property
    def nbytes(self) -> int | None:
        """Bytes of latents and images; None (not movable) when the inner dataset is not a tensor dataset."""
        inner = getattr(self.dataset, "nbytes", None)
        return None if inner is None else self.latents.nbytes + inner

    def to(self, device) -> "LatentDataset":
        self.latents = self.latents.to(device)
        if hasattr(self.dataset, "to"):
            self.dataset.to(device)
        return self


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


class CachedLatentsDataModule(ImageDataModule):
    """``datamodule`` with every item's raw latent added (:class:`LatentDataset`), encoded once by
    ``autoencoder`` on the trainer's device when set up, cached on disk. Everything else (name, sizes,
    labels, captions, batch size, workers) is ``datamodule``'s."""

    def __init__(self, datamodule: ImageDataModule, autoencoder):
        super().__init__(image_size=datamodule.image_size, channels=datamodule.channels,
                         batch_size=datamodule.batch_size, num_workers=datamodule.num_workers, seed=datamodule.seed)
        self.inner, self.autoencoder = datamodule, autoencoder
        self.name, self.num_classes = datamodule.name, datamodule.num_classes

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.autoencoder.to(device)
        self.train_set, self.val_set = (LatentDataset(d, encode_dataset(d, self.autoencoder, device))
                                        for d in (self.inner.dataset("train"), self.inner.dataset("val")))
