"""Streamed, sharded training data that resumes exactly: the part shared by ``data=webdataset`` and
``data=hf_dataset data.streaming=true``.

A data source is a list of shards, a reader of one shard's raw samples and a decoder of one raw sample into an
item ``{"image", "caption"?, "label"?}``. :class:`ShardStream` makes batches from them as an endless stream:

- each pass ("epoch" e) over the data permutes the shards by (seed, e); the streams (one per DDP rank and
  DataLoader worker, ``slot = rank * workers + worker``) take every ``slots``-th shard of that order, so no two
  ranks or workers read the same shard;
- a stream's raw samples pass a shuffle buffer seeded by (seed, e, slot) (WebDataset's buffered shuffle), then
  are decoded; a sample that cannot be read is counted and skipped, and more than ``max_unreadable`` of them in
  one stream stop the run with the last one named;
- batches are cut from the decoded items and may cross passes (training is by steps).

The DataLoader takes batches from its workers in turn (batch k from worker k mod W), so the batch order is a
function of the seed alone; a run resumed after ``b`` batches gives its loader's workers the streams of the
workers whose turn comes next, each replaying its stream up to the items it had delivered (read and decoded,
not trained on) and going on from there: the batches an uninterrupted run sees,
mid-epoch, after several resumes and under DDP, as :class:`diffexp.data.base.EpochSeededSampler` gives
in-memory data.
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from diffexp.data.base import ImageDataModule, TensorImageDataset


class UnreadableSample(Exception):
    """A raw sample that cannot be decoded; ``name`` says which (shard and key)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def stream_seed(*parts: int) -> int:
    """One 63-bit seed from integers (a fixed mixing, not Python's salted ``hash``)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 0x9E3779B9) % (2 ** 63)
    return seed


def buffer_shuffle(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Items in a random order from a buffer of ``buffer_size``: once the buffer is full, each new item takes the
    place of a uniformly chosen one, which is yielded (WebDataset's ``shuffle`` with ``initial=bufsize``)."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def collate_items(items: list[dict]) -> dict:
    """A batch dict from item dicts: tensors stacked, captions listed, labels as a LongTensor."""
    return default_collate(items)


class ShardStream(IterableDataset):
    """Batches of ``batch_size`` decoded items from ``shards`` (see the module docstring).

    ``read_shard(shard)`` yields raw samples; ``decode(raw, flip)`` makes an item or raises
    :class:`UnreadableSample`; ``flip`` (a mirror, drawn from the stream's generator when ``random_flip``) is part
    of the reproducible stream. ``start_batches`` is set by :class:`StreamLoader` to the batches this rank has
    already consumed.
    """

    def __init__(self, shards: list, read_shard: Callable, decode: Callable, batch_size: int, seed: int = 0,
                 buffer_size: int = 1000, max_unreadable: int = 0, random_flip: bool = False, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.shards, self.read_shard, self.decode = list(shards), read_shard, decode
        self.batch_size, self.seed, self.buffer_size = batch_size, seed, buffer_size
        self.max_unreadable, self.random_flip = max_unreadable, random_flip
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.start_batches = 0
        slots = self.world_size * self.num_workers
        if len(self.shards) < slots:
            raise ValueError(f"{len(self.shards)} shards for {slots} data streams ({self.world_size} processes x "
                             f"{self.num_workers} loader workers): each stream needs a shard of its own; write "
                             f"more, smaller shards or lower data.num_workers")

    def slot(self) -> tuple[int, int]:
        """(this stream's slot, the number of slots): one per (rank, worker). A DataLoader takes its first batch
        from worker 0; after ``start_batches`` the next batch is the one of worker ``start_batches`` mod W of
        the uninterrupted run, so loader worker w plays that run's worker (w + start_batches) mod W."""
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.start_batches) % self.num_workers
        return self.rank * self.num_workers + worker, self.world_size * self.num_workers

    def delivered_batches(self, worker: int) -> int:
        """Batches worker ``worker`` made of the ``start_batches`` this rank consumed (batch k from worker k mod W)."""
        return len(range(worker, self.start_batches, self.num_workers))

    def items(self, slot: int, slots: int) -> Iterator[dict]:
        """This stream's decoded items, pass after pass, unreadable ones counted and skipped."""
        unreadable = 0
        epoch = 0
        ever_read, seen_empty = False, set()
        while True:
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
                stream_seed(self.seed, epoch))).tolist()
            mine = [self.shards[i] for i in order[slot::slots]]
            rng = random.Random(stream_seed(self.seed, epoch, slot))
            read = [0]

            def counted(shards=mine):
                for shard in shards:
                    for sample in self.read_shard(shard):
                        read[0] += 1
                        yield sample

            for sample in buffer_shuffle(counted(), self.buffer_size, rng):
                flip = self.random_flip and rng.random() < 0.5
                try:
                    yield self.decode(sample, flip)
                except UnreadableSample as bad:
                    unreadable += 1
                    if unreadable > self.max_unreadable:
                        raise RuntimeError(f"{unreadable} unreadable samples in one data stream, more than "
                                           f"data.max_unreadable={self.max_unreadable}; the last: {bad}. Fix or "
                                           f"remove it, or raise data.max_unreadable") from None
                    warnings.warn(f"skipping unreadable sample {bad} ({unreadable} of at most "
                                  f"data.max_unreadable={self.max_unreadable} in this stream)", stacklevel=2)
            ever_read = ever_read or read[0] > 0
            if read[0] == 0:  # a pass of empty shards; once every shard was seen empty, fail instead of looping
                seen_empty.update(mine)
                if not ever_read and len(seen_empty) >= len(self.shards):
                    raise RuntimeError(f"data stream {slot} of {slots} read no sample from any shard "
                                       f"({len(self.shards)}: {self.shards[:4]}{' ...' if len(self.shards) > 4 else ''}): "
                                       f"they are empty")
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self.slot()
        worker = slot - self.rank * self.num_workers
        items = self.items(slot, slots)
        skip = self.delivered_batches(worker) * self.batch_size
        for _ in islice(items, skip):  # replay what was delivered before a resume
            pass
        while True:
            yield collate_items(list(islice(items, self.batch_size)))


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` that tells it, each time iteration starts, how many batches this
    rank has consumed (``progress()``), so a resumed run goes on where it stopped."""

    def __init__(self, stream: ShardStream, progress: Callable[[], int] | None, num_workers: int, pin_memory: bool):
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False)
        self.progress = progress

    def __iter__(self):
        self.dataset.start_batches = self.progress() if self.progress is not None else 0
        return super().__iter__()


class StreamingDataModule(ImageDataModule):
    """Base of the streamed datamodules. Subclasses give :meth:`shards`, :meth:`read_shard` and :meth:`decode`.

    Training batches come from a :class:`ShardStream`. What needs indexable data -- validation, the latent scale
    estimate, image grids, the FID callback's reference -- gets the first ``preview_size`` items of a split
    (``val_size`` for validation) in file order, held in memory: ``data.val_shards`` names held-out shards; without
    them validation reads the first training items (not held out; a warning says so).
    """

    SPLITS = ("train", "val")

    def __init__(self, image_size: int = 64, channels: int = 3, batch_size: int = 64, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1000, max_unreadable: int = 0, random_flip: bool = True,
                 val_size: int = 256, preview_size: int = 1024, num_classes: int | None = None):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, num_workers=num_workers,
                         seed=seed)
        for option, value, low in (("shuffle_buffer", shuffle_buffer, 1), ("max_unreadable", max_unreadable, 0),
                                   ("val_size", val_size, 1), ("preview_size", preview_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{option} must be an integer >= {low}, got {value!r}")
        self.shuffle_buffer, self.max_unreadable, self.random_flip = shuffle_buffer, max_unreadable, random_flip
        self.val_size, self.preview_size = val_size, preview_size
        self.num_classes = num_classes

    # -- what a source provides
    def shards(self, split: str) -> list:
        """The shards of ``split`` (``val``: [] when there is no held-out split)."""
        raise NotImplementedError

    def read_shard(self, shard) -> Iterator:
        """The raw samples of one shard, in file order."""
        raise NotImplementedError

    def decode(self, raw, flip: bool = False) -> dict:
        """An item from a raw sample; :class:`UnreadableSample` when it cannot be read."""
        raise NotImplementedError

    @property
    def reference_key(self) -> str:
        """The data's name with a hash of its shards and preview size: cached reference features of other shards
        are not mistaken for these."""
        import hashlib

        text = repr((self.shards("train"), self.shards("val"), self.preview_size, self.val_size))
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    # -- shared
    def iter_items(self, split: str = "train", max_n: int | None = None) -> Iterator[dict]:
        """The items of ``split`` in file order, unshuffled, unflipped, unreadable ones skipped with a warning."""
        shards = self.shards(split)
        if split == "val" and not shards:  # no held-out data: the first val_size training items
            shards = self.shards("train")
            max_n = self.val_size if max_n is None else min(max_n, self.val_size)
        count = 0
        for shard in shards:
            for raw in self.read_shard(shard):
                if max_n is not None and count >= max_n:
                    return
                try:
                    item = self.decode(raw, False)
                except UnreadableSample as bad:
                    warnings.warn(f"skipping unreadable sample {bad}", stacklevel=2)
                    continue
                count += 1
                yield item

    def head(self, split: str, n: int) -> TensorImageDataset:
        """The first ``n`` items of ``split`` as an in-memory dataset."""
        items = list(self.iter_items(split, n))
        if not items:
            raise ValueError(f"data: the {split} split yielded no readable samples")
        labels = torch.as_tensor([it["label"] for it in items]) if "label" in items[0] else None
        captions = [it["caption"] for it in items] if "caption" in items[0] else None
        return TensorImageDataset(torch.stack([it["image"] for it in items]), labels, captions)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.shards("val"):
            warnings.warn(f"{self.name}: no held-out split (data.val_shards / data.val_split): validation uses the "
                          f"first data.val_size training samples, which are not held out", stacklevel=2)
        self.train_set = self.head("train", self.preview_size)
        self.val_set = self.head("val", self.val_size)

    def stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The training stream of one rank."""
        return ShardStream(self.shards("train"), self.read_shard, self.decode, self.batch_size, self.seed,
                           self.shuffle_buffer, self.max_unreadable, self.random_flip, rank, world_size,
                           self.num_workers)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        progress = None
        if trainer is not None:
            progress = lambda: trainer.global_step * trainer.accumulate_grad_batches  # noqa: E731
        stream = self.stream(trainer.global_rank if trainer else 0, trainer.world_size if trainer else 1)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return StreamLoader(stream, progress, self.num_workers, pin_memory=device.type == "cuda")
