"""``data=webdataset data.shards='DIR/train-{000000..000099}.tar'``: images streamed from tar shards.

The shard format is WebDataset's (a sample is the files sharing a basename: ``0001.jpg`` with ``0001.txt`` or
``0001.json`` for its caption and ``0001.cls`` for its class), read with the ``webdataset`` library: it expands
the brace patterns, streams the tars (local paths, ``pipe:`` commands or URLs) and groups members into samples,
and is what LAION-style datasets ship in. The order, sharding and resume logic is diffexp's own
(:mod:`diffexp.data.streaming`), because it has to be a function of the seed alone for exact resumes.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from diffexp.data.streaming import StreamingDataModule, UnreadableSample
from diffexp.data.transforms import open_image_bytes, preprocess
from diffexp.registry import register_part

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm")


def expand_shards(pattern, option: str = "data.shards") -> list[str]:
    """Shard URLs from a brace pattern (``train-{000000..000099}.tar``), a list of patterns, ``a.tar::b.tar``, or
    a directory (its ``*.tar`` files in sorted order). Local files must exist (remote URLs and ``pipe:`` are read
    as they come)."""
    import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    urls = []
    for part in (part for p in patterns for part in str(p).split("::")):
        if Path(part).expanduser().is_dir():
            found = sorted(str(f) for f in Path(part).expanduser().glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{option}={part!r} is a directory without .tar shards")
            urls += found
        else:
            urls += list(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"{option} is empty; give a shard pattern such as 'DIR/train-{{000000..000099}}.tar' or a "
                         f"directory of .tar shards")
    missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"{option}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}")
    return urls


def caption_of(sample: dict, caption_key: str) -> str | None:
    """The caption of a WebDataset sample: its ``.txt`` member, else ``caption_key`` of its ``.json``."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        for key in (caption_key, "caption", "text"):
            if isinstance(meta.get(key), str):
                return meta[key]
    return None


@register_part
class WebDatasetDataModule(StreamingDataModule):
    """WebDataset tar shards (see the module docstring); ``captions``: whether items carry captions (a sample
    without one is then unreadable); ``labels``: whether items carry the ``.cls`` class (``num_classes`` needed).
    """

    name = "webdataset"

    def __init__(self, shards, val_shards=None, captions: bool = False, caption_key: str = "caption",
                 labels: bool = False, image_size: int = 64, channels: int = 3, batch_size: int = 64,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000, max_unreadable: int = 0,
                 random_flip: bool = True, val_size: int = 256, preview_size: int = 1024,
                 num_classes: int | None = None):
        super().__init__(image_size=image_size, channels=channels, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, shuffle_buffer=shuffle_buffer, max_unreadable=max_unreadable,
                         random_flip=random_flip, val_size=val_size, preview_size=preview_size,
                         num_classes=num_classes)
        if labels and not num_classes:
            raise ValueError("data.labels=true needs data.num_classes (the number of classes in the .cls members)")
        self.train_urls = expand_shards(shards)
        self.val_urls = expand_shards(val_shards, "data.val_shards") if val_shards else []
        self.with_captions, self.caption_key, self.with_labels = captions, caption_key, labels

    def shards(self, split: str) -> list[str]:
        return self.train_urls if split == "train" else self.val_urls

    def read_shard(self, shard: str) -> Iterator[dict]:
        """The shard's samples (dicts of member bytes with ``__key__`` and ``__url__``); a tar that breaks off or
        cannot be opened ends with one sample holding the error, which :meth:`decode` reports as unreadable."""
        import webdataset as wds

        failures: list[Exception] = []

        def keep_going(exn: Exception) -> bool:
            failures.append(exn)
            return False  # stop reading this shard

        yield from wds.tarfile_samples([{"url": shard}], handler=keep_going)
        for exn in failures:
            yield {"__key__": "(tar)", "__url__": shard, "__error__": f"{type(exn).__name__}: {exn.args[0]}"}

    def decode(self, raw: dict, flip: bool = False) -> dict:
        name = f"{raw.get('__url__')}:{raw.get('__key__')}"
        if "__error__" in raw:
            raise UnreadableSample(name, raw["__error__"])
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise UnreadableSample(name, f"no image member (one of .{', .'.join(IMAGE_KEYS)}); has {sorted(raw)}")
        try:
            image = open_image_bytes(raw[key])
            item = {"image": preprocess(image, self.image_size, self.channels, flip)}
        except Exception as e:  # PIL raises many kinds for broken files
            raise UnreadableSample(f"{name}.{key}", f"{type(e).__name__}: {e}"[:160]) from None
        if self.with_captions:
            caption = caption_of(raw, self.caption_key)
            if caption is None:
                raise UnreadableSample(name, "no caption (.txt, or .json with a 'caption'/'text' field)")
            item["caption"] = caption
        if self.with_labels:
            if "cls" not in raw:
                raise UnreadableSample(name, "no .cls member with the class label")
            text = raw["cls"].decode(errors="replace").strip()
            if not text.isdigit() or int(text) >= self.num_classes:
                raise UnreadableSample(f"{name}.cls", f"class {text!r} is not one of 0..{self.num_classes - 1} "
                                                      f"(data.num_classes={self.num_classes})")
            item["label"] = int(text)
        return item
