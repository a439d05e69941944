"""``python -m diffexp.make_shards data=... out=DIR``: the items of a dataset (as its datamodule preprocesses them, in
file order, unflipped) written as WebDataset tar shards with the ``webdataset`` library's writer: ``out/SPLIT/
000000.tar``, ... with ``KEY.png`` (or ``.jpg``), ``KEY.txt`` (caption) and ``KEY.cls`` (class) per sample. Train on
them with ``data=webdataset data.shards=DIR/train``. An existing ``out`` with files in it is refused.
"""
from __future__ import annotations

import io
import sys
from itertools import islice
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image


FORMATS = {"png": "PNG", "jpg": "JPEG"}


def encode_image(image, fmt: str, quality: int = 95) -> bytes:
    """A [-1, 1] (C, H, W) tensor as PNG or JPEG bytes."""
    from diffexp.images import to_uint8

    array = to_uint8(image[None])[0].permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    pil.save(buffer, FORMATS[fmt], **({"quality": quality} if fmt == "jpg" else {}))
    return buffer.getvalue()


def write_shards(items, folder: Path, shard_size: int, fmt: str = "png", quality: int = 95, progress=None) -> list[Path]:
    """``items`` (dicts with ``image``, ``caption``?, ``label``?) into ``folder/000000.tar``, ...; the paths."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths, items, index = [], iter(items), 0
    while chunk := list(islice(items, shard_size)):
        path = folder / f"{len(paths):06d}.tar"
        with wds.TarWriter(str(path.with_suffix(".tar.partial"))) as writer:
            for item in chunk:
                sample = {"__key__": f"{index:09d}", fmt: encode_image(item["image"], fmt, quality)}
                if item.get("caption") is not None:
                    sample["txt"] = item["caption"]
                if item.get("label") is not None:
                    sample["cls"] = str(int(item["label"]))
                writer.write(sample)
                index += 1
        path.with_suffix(".tar.partial").replace(path)
        paths.append(path)
        if progress is not None:
            progress.update(len(chunk))
    return paths


def run(cfg: DictConfig) -> dict:
    from tqdm import tqdm

    from diffexp.config import check_number

    check_number("shard_size", cfg.shard_size, integer=True, positive=True)
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}; allowed: {list(FORMATS)}")
    splits = list(cfg.splits)
    if not splits or any(s not in ("train", "val") for s in splits):
        raise ValueError(f"splits={splits}; allowed: train, val")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={str(out)!r} exists and is not empty; choose a new directory (nothing there is "
                              f"overwritten)")
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if "random_flip" in data_cfg:
        data_cfg["random_flip"] = False
    datamodule = instantiate(data_cfg)
    counts = {}
    for split in splits:
        if split == "val" and hasattr(datamodule, "shards") and not datamodule.shards("val"):
            print(f"[diffexp] {datamodule.name} has no held-out split: no val written", flush=True)
            continue
        bar = tqdm(desc=f"writing {split}", unit="img", disable=not cfg.progress, file=sys.stderr, mininterval=2)
        paths = write_shards(datamodule.iter_items(split), out / split, cfg.shard_size, cfg.format, cfg.quality, bar)
        bar.close()
        counts[split] = len(paths)
        last = f"{len(paths) - 1:06d}"
        print(f"[diffexp] {split}: {len(paths)} shards in {out / split} ({out / split}/{{000000..{last}}}.tar)",
              flush=True)
    print(f"[diffexp] train on them: data=webdataset data.shards={out / 'train'} data.image_size="
          f"{datamodule.image_size} data.channels={datamodule.channels}"
          + (f" data.val_shards={out / 'val'}" if "val" in counts else ""), flush=True)
    return counts


if __name__ == "__main__":
    from diffexp.config import run_module_app

    run_module_app("make_shards", run)
