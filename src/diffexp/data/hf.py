"""``data=hf_dataset data.path=... data.split=train data.image_column=image data.caption_column=text``: a Hugging
Face ``datasets`` dataset, read by that library: a folder written by ``save_to_disk``, local Arrow or Parquet
files (``data.path=parquet data.data_files='DIR/*.parquet'``), an imagefolder (``data.path=imagefolder
data.data_dir=DIR``) or a hub dataset in the local cache.

``data.streaming=false`` (default): random access, the same reproducible order and exact resumes as in-memory data.
``data.streaming=true``: the dataset's shards are streamed through :mod:`diffexp.data.streaming`.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from diffexp.data.base import ImageDataModule, flip_key, split_indices
from diffexp.data.streaming import StreamingDataModule, UnreadableSample
from diffexp.data.transforms import preprocess
from diffexp.registry import register_part


def load_hf_dataset(path: str, split: str, config_name: str | None = None, data_dir: str | None = None,
                    data_files=None, streaming: bool = False):
    """``split`` of the dataset at ``path``: a ``save_to_disk`` folder (``load_from_disk``) or anything
    ``datasets.load_dataset`` takes; errors name the option."""
    import datasets

    folder = Path(path).expanduser()
    if folder.is_dir() and ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists()):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"data.split={split!r}: {path} has the splits {sorted(loaded)}")
            loaded = loaded[split]
        elif split != "train":
            raise ValueError(f"data.split={split!r} / data.val_split: {path} is one dataset without splits (saved "
                             f"from a Dataset, not a DatasetDict); use data.split=train and data.val_fraction")
        # one shard per 16 rows, at most 4,096: enough streams for many ranks x workers
        return loaded.to_iterable_dataset(num_shards=max(1, min(4096, len(loaded) // 16))) if streaming else loaded
    try:
        return datasets.load_dataset(path, config_name, split=split, data_dir=data_dir, data_files=data_files,
                                     streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ValueError(f"data.path={path!r} (data.split={split!r}): the datasets library cannot load it: "
                         f"{type(e).__name__}: {e}"[:600]) from e


def column_image(value) -> Image.Image:
    """A PIL image from an image column's value: a PIL image (the ``Image`` feature decoded), a dict with
    ``bytes``/``path`` (undecoded), raw bytes, or an array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    import numpy as np

    return Image.fromarray(np.asarray(value).astype("uint8"))


class ColumnReader:
    """Items from rows: the image of ``image_column`` preprocessed, ``caption_column`` and ``label_column``."""

    def __init__(self, image_column: str, caption_column: str | None, label_column: str | None, image_size: int,
                 channels: int):
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.image_size, self.channels = image_size, channels

    def check_columns(self, columns) -> None:
        columns = list(columns or [])
        if not columns:
            return
        for option, column in (("image_column", self.image_column), ("caption_column", self.caption_column),
                               ("label_column", self.label_column)):
            if column is not None and column not in columns:
                raise ValueError(f"data.{option}={column!r} is not a column of the dataset; its columns: {columns}")

    def item(self, row: dict, name: str, flip: bool = False) -> dict:
        try:
            image = column_image(row[self.image_column])
            item = {"image": preprocess(image, self.image_size, self.channels, flip)}
        except Exception as e:  # PIL raises many kinds for broken images
            raise UnreadableSample(name, f"{type(e).__name__}: {e}"[:160]) from None
        if self.caption_column is not None:
            item["caption"] = str(row[self.caption_column] or "")
        if self.label_column is not None:
            item["label"] = int(row[self.label_column])
        return item


class HFImageDataset(Dataset):
    """Random access to rows ``indices`` of a ``datasets.Dataset`` as items; with ``random_flip`` the training
    sampler's keys carry a mirror flip (:class:`~diffexp.data.base.EpochSeededSampler`, resumable)."""

    def __init__(self, rows, indices: list[int], reader: ColumnReader, random_flip: bool):
        self.rows, self.indices, self.reader, self.random_flip = rows, indices, reader, random_flip
        column = reader.caption_column
        self.captions = None if column is None else [str(c or "") for c in rows.select(indices)[column]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int) -> dict:
        i, flip = flip_key(key, len(self))
        try:
            return self.reader.item(self.rows[self.indices[i]], f"row {self.indices[i]}", flip)
        except UnreadableSample as bad:
            raise ValueError(f"data=hf_dataset: {bad}") from None


@register_part
class HFDataModule(StreamingDataModule):
    """A Hugging Face dataset (see the module docstring). ``val_split``: a held-out split (else ``val_fraction`` of
    ``split`` is held out when random access, or validation reads the first items when streaming)."""

    name = "hf_dataset"

    def __init__(self, path: str, split: str = "train", image_column: str = "image", caption_column: str | None = None,
                 label_column: str | None = None, config_name: str | None = None, data_dir: str | None = None,
                 data_files=None, streaming: bool = False, val_split: str | None = None, val_fraction: float = 0.05,
                 image_size: int = 64, channels: int = 3, batch_size: int = 64, num_workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 1000, max_unreadable: int = 0, random_flip: bool = True, val_size: int = 256,
                 preview_size: int = 1024, num_classes: int | None = None):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, shuffle_buffer=shuffle_buffer, max_unreadable=max_unreadable,
                         random_flip=random_flip, val_size=val_size, preview_size=preview_size,
                         num_classes=num_classes)
        if not path:
            raise ValueError("data.path is required: a save_to_disk folder, 'parquet', 'arrow', 'imagefolder' "
                             "(with data.data_files / data.data_dir) or a cached hub dataset id")
        self.path, self.split, self.val_split, self.val_fraction = path, split, val_split, val_fraction
        self.load_options = {"config_name": config_name, "data_dir": data_dir, "data_files": data_files}
        self.streaming = streaming
        self.reader = ColumnReader(image_column, caption_column, label_column, image_size, channels)
        self._streams: dict[str, object] = {}

    def load(self, split: str, streaming: bool):
        dataset = load_hf_dataset(self.path, split, streaming=streaming, **self.load_options)
        self.reader.check_columns(dataset.column_names)
        if self.num_classes is None and self.reader.label_column is not None:
            feature = (dataset.features or {}).get(self.reader.label_column)
            self.num_classes = getattr(feature, "num_classes", None)
        return dataset

    # -- streaming source
    def source(self, split: str):
        if split not in self._streams:
            name = self.split if split == "train" else self.val_split
            self._streams[split] = None if name is None else self.load(name, streaming=True)
        return self._streams[split]

    def shards(self, split: str) -> list:
        source = self.source(split)
        return [] if source is None else [(split, i) for i in range(source.num_shards)]

    def read_shard(self, shard) -> Iterator:
        split, index = shard
        source = self.source(split)
        one = source.shard(num_shards=source.num_shards, index=index)
        # iterating the IterableDataset itself inside a DataLoader worker would split this one shard again over
        # the workers (datasets' own sharding; all but one would read nothing): .iter() reads it whole
        for row_number, batch in enumerate(one.iter(batch_size=1)):
            yield shard, row_number, {column: values[0] for column, values in batch.items()}

    def decode(self, raw, flip: bool = False) -> dict:
        (split, index), row_number, row = raw
        return self.reader.item(row, f"{self.path} {split} shard {index} row {row_number}", flip)

    # -- random access
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.streaming:
            return super().setup(stage)
        rows = self.load(self.split, streaming=False)
        if self.val_split is not None:
            val_rows = self.load(self.val_split, streaming=False)
            train_idx, val_idx = list(range(len(rows))), list(range(len(val_rows)))
        else:
            val_rows = rows
            train_idx, val_idx = (idx.tolist() for idx in split_indices(len(rows), self.val_fraction, self.seed))
        val_idx = val_idx[:self.val_size]  # validation reads at most data.val_size items
        self.train_set = HFImageDataset(rows, train_idx, self.reader, self.random_flip)
        self.val_set = HFImageDataset(val_rows, val_idx, self.reader, False)

    def train_dataloader(self):
        if self.streaming:
            return super().train_dataloader()
        return ImageDataModule.train_dataloader(self)

    def iter_items(self, split: str = "train", max_n: int | None = None) -> Iterator[dict]:
        if self.streaming:
            yield from super().iter_items(split, max_n)
            return
        yield from ImageDataModule.iter_items(self, split, max_n)
