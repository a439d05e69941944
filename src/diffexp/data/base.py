"""Shared pieces of the data modules."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler):
    """A random permutation of range(n) that depends only on (seed, epoch).

    Lightning calls :meth:`set_epoch` before each epoch (as for ``DistributedSampler``). With ``epoch_fn``
    the epoch is instead read when an epoch's iteration starts (the datamodule passes "optimizer steps done
    / steps per epoch"), so the data order is a function of the seed and the training progress alone: a run
    resumed at an epoch boundary, even after several resumes, sees exactly the batches an uninterrupted run
    sees (Lightning's own epoch counter can be off by one after chained resumes).
    """

    def __init__(self, n: int, seed: int = 0, epoch_fn=None):
        self.n, self.seed, self.epoch, self.epoch_fn = n, seed, 0, epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch, skip = self.epoch_fn() if self.epoch_fn is not None else (self.epoch, 0)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist()[skip:])


class TensorImageDataset(Dataset):
    """In-memory images in [-1, 1] (N, C, H, W) with optional labels and captions, yielding dicts.

    ``captions`` (one per item, or None) is what every diffexp dataset declares.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, captions: list[str] | None = None):
        self.images, self.labels, self.captions = images, labels, captions

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic random (train, val) split of range(n)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


class ImageDataModule(L.LightningDataModule):
    """Base of every diffexp datamodule, and what models and callbacks may read from one:

    - ``name``, ``channels``, ``image_size``; ``num_classes`` (None for unlabelled data);
    - :meth:`dataset` (``"train"``/``"val"``): items are dicts {"image": [-1, 1] (C, H, W), "label"?, "caption"?};
    - :meth:`captions` (``"train"``/``"val"``): one caption per item, or None.

    Subclasses set ``self.train_set`` / ``self.val_set`` in ``setup``; both readers set the module up on first use.
    """

    name = "images"
    num_classes: int | None = None
    SPLITS = ("train", "val")

    def __init__(self, image_size: int = 32, channels: int = 3, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        if image_size <= 0:
            raise ValueError(f"data.image_size must be positive, got {image_size}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def dataset(self, split: str) -> Dataset:
        """The ``train`` or ``val`` dataset (set up on first use)."""
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {list(self.SPLITS)}, got {split!r}")
        if self.train_set is None:
            self.setup("fit")
        return self.train_set if split == "train" else self.val_set

    def captions(self, split: str) -> list[str] | None:
        """The captions of ``split`` in item order, or None when the data has none."""
        return getattr(self.dataset(split), "captions", None)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        drop_last = shuffle and len(dataset) >= self.batch_size
        trainer = self.trainer

        def epoch_from_progress() -> tuple[int, int]:
            """(epoch, items to skip) from the optimizer steps done: an epoch of B batches per rank (DDP shards
            the data, ceil(n / W) each) takes ceil(B / accumulate) steps (Lightning steps on an epoch's last
            batch). At an epoch start the skip is 0; a single-process run resumed in mid-epoch goes on with the
            rest of that epoch's permutation (under DDP Lightning's sampler wrapper needs the full epoch: the
            resumed epoch starts over)."""
            per_rank = -(-len(dataset) // trainer.world_size)
            batches = max(1, per_rank // self.batch_size if drop_last else -(-per_rank // self.batch_size))
            accumulate = trainer.accumulate_grad_batches
            epoch, steps = divmod(trainer.global_step, -(-batches // accumulate))
            skip = steps * accumulate * self.batch_size if trainer.world_size == 1 else 0
            return epoch, skip

        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed, epoch_from_progress if trainer else None)
            if shuffle else None,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
