"""Shared pieces of the data modules."""
from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate


class EpochSeededSampler(DistributedSampler):
    """One rank's share of a random permutation of range(n) that depends only on (seed, epoch).

    As torch's ``DistributedSampler`` (which it is, so Lightning does not wrap it): the permutation is padded
    by repeating its start to a multiple of ``num_replicas`` and rank r takes every ``num_replicas``-th item
    from r. Lightning calls :meth:`set_epoch` before each epoch. With ``progress`` the epoch is instead read
    when an epoch's iteration starts, with a number of this rank's items to skip (the datamodule passes them
    from the optimizer steps done): the data order is a function of the seed and the training progress
    alone, so a run resumed at any checkpoint -- mid-epoch, after several resumes, under DDP -- sees exactly
    the batches an uninterrupted run sees (Lightning's own epoch counter can be off by one after chained
    resumes, and its loaders restart an interrupted epoch from its first batch).

    With ``flips`` each position of the epoch's order also draws a mirror flip (probability 1/2, from the same
    generator after the permutation) and the sampler yields keys ``index + n * flip`` (:func:`flip_key` decodes
    them), so random flips are as resumable as the order.
    """

    def __init__(self, n: int, seed: int = 0, progress=None, num_replicas: int = 1, rank: int = 0,
                 flips: bool = False):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n, self.progress, self.flips = n, progress, flips

    def __iter__(self):
        epoch, skip = self.progress() if self.progress is not None else (self.epoch, 0)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        order += (order * (-(-self.total_size // max(1, self.n))))[:self.total_size - self.n]  # pad as torch does
        if self.flips:
            flipped = (torch.rand(self.total_size, generator=generator) < 0.5).tolist()
            order = [i + self.n * f for i, f in zip(order, flipped)]
        return iter(order[self.rank:self.total_size:self.num_replicas][skip:])


def flip_key(key: int, n: int) -> tuple[int, bool]:
    """(index, flip) of a key of :class:`EpochSeededSampler` with ``flips`` (a plain index: no flip); keys outside
    [0, 2n) raise IndexError (so iteration by index stops)."""
    if not 0 <= key < 2 * n:
        raise IndexError(f"item {key} of {n}")
    return key % n, key >= n


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

    def batch(self, indices: list[int]) -> dict:
        """A whole batch by one indexing operation per tensor (served by the datamodules' loaders through
        :class:`BatchedDataset`)."""
        index = torch.as_tensor(indices, device=self.images.device)
        batch = {"image": self.images[index]}
        if self.labels is not None:
            batch["label"] = self.labels[index]
        if self.captions is not None:
            batch["caption"] = [self.captions[i] for i in indices]
        return batch

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.images, self.labels) if t is not None)

    def to(self, device) -> "TensorImageDataset":
        """Move the tensors to ``device`` (in place; returns self)."""
        self.images = self.images.to(device)
        self.labels = self.labels.to(device) if self.labels is not None else None
        return self


class BatchedDataset(Dataset):
    """``dataset`` whose DataLoader fetches a batch with one ``dataset.batch(indices)`` call instead of one
    ``__getitem__`` per item (torch's ``__getitems__`` protocol; pair it with :func:`collate_batch`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> dict:
        return self.dataset.batch(indices)


def collate_batch(items):
    """The DataLoader's collate function: a batch already built by a dataset's ``__getitems__`` as is, else
    torch's ``default_collate`` of the items."""
    return items if isinstance(items, dict) else default_collate(items)


def device_resident(dataset: Dataset, device: torch.device, share: float = 0.25) -> bool:
    """Whether to serve ``dataset`` from ``device`` memory: a tensor dataset (one with ``to`` and ``nbytes``) on a
    CUDA device, taking at most ``share`` of its free memory."""
    if device.type != "cuda" or not hasattr(dataset, "to") or getattr(dataset, "nbytes", None) is None:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return dataset.nbytes <= share * free


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
        for option, value in (("batch_size", batch_size), ("image_size", image_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"data.{option} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a non-negative integer (0: load in the main process), "
                             f"got {num_workers!r}")
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

    def iter_items(self, split: str = "train", max_n: int | None = None):
        """The items of ``split`` in dataset order (the first ``max_n``)."""
        dataset = self.dataset(split)
        for i in range(len(dataset) if max_n is None else min(max_n, len(dataset))):
            yield dataset[i]

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        drop_last = shuffle and len(dataset) >= self.batch_size
        trainer = self.trainer

        def epoch_from_progress() -> tuple[int, int]:
            """(epoch, this rank's items to skip) from the optimizer steps done. An epoch of B batches per rank
            (DDP shards the data, ceil(n / W) items each; ``trainer.limit_train_batches`` may cut it) takes
            ceil(B / accumulate) optimizer steps (Lightning also steps on an epoch's last batch); a run resumed
            in mid-epoch goes on with the rest of that epoch's order."""
            batches = trainer.num_training_batches
            if not math.isfinite(batches):  # before Lightning has measured the loader
                per_rank = -(-len(dataset) // trainer.world_size)
                batches = max(1, per_rank // self.batch_size if drop_last else -(-per_rank // self.batch_size))
            accumulate = trainer.accumulate_grad_batches
            epoch, steps = divmod(trainer.global_step, -(-int(batches) // accumulate))
            return epoch, steps * accumulate * self.batch_size

        strategy = getattr(trainer, "strategy", None)
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        on_device = device_resident(dataset, device)
        if on_device:  # indexed on the GPU: no workers, no pinning, no host-to-device copy per batch
            dataset.to(device)
        workers = 0 if on_device else self.num_workers
        sampler = None
        if shuffle:
            sampler = EpochSeededSampler(len(dataset), self.seed, epoch_from_progress if trainer else None,
                                         num_replicas=trainer.world_size if trainer else 1,
                                         rank=trainer.global_rank if trainer else 0,
                                         flips=bool(getattr(dataset, "random_flip", False)))
        return DataLoader(
            BatchedDataset(dataset) if hasattr(dataset, "batch") else dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda" and not on_device,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def batch_size_of(batch: dict) -> int:
    """The number of items in a batch dict: its images, or its latents (encoded data carries no images)."""
    return len(batch["image"] if "image" in batch else batch["latent"])
