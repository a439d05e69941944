"""Can the data pipeline keep up? Decoded images per second from WebDataset shards of 64x64 JPEGs (2 loader
workers: read, buffer-shuffle, JPEG decode, resize/crop/flip, collate) against the images per second the tiny
U-Net trains on at the same size and batch, measured in the same run on the same machine.

A ratio (data / training) above 1 means the step never waits for data; the training figure is the bare
optimizer step of ``loop_overhead.py`` (no Lightning around it), so the ratio is a lower bound.

    python experiments/bench/data_speed.py --json experiments/results/bench/data_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_jpeg_shards(folder: Path, n: int, size: int, per_shard: int) -> int:
    """``n`` procedural shapes at ``size`` px as JPEG WebDataset shards; the shard count."""
    from diffexp.data import ShapesDataModule
    from diffexp.make_shards import write_shards

    data = ShapesDataModule(num_train=n, num_val=8, image_size=size)
    return len(write_shards(data.iter_items("train"), folder, per_shard, fmt="jpg", quality=90))


def data_images_per_second(folder: Path, size: int, batch_size: int, workers: int, batches: int,
                           warmup: int) -> float:
    """Images per second delivered by the training loader of ``data=webdataset`` over ``folder``."""
    from diffexp.data import WebDatasetDataModule

    dm = WebDatasetDataModule(str(folder), captions=True, image_size=size, batch_size=batch_size,
                              num_workers=workers, shuffle_buffer=1000)
    loader = iter(dm.train_dataloader())
    for _ in range(warmup):  # worker start-up and the shuffle buffer's first fill
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
    assert batch["image"].shape == (batch_size, 3, size, size)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    from loop_overhead import bare_step_seconds

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_jpeg_shards(Path(tmp), args.images, args.size, per_shard=256)
        data_rate = data_images_per_second(Path(tmp), args.size, args.batch_size, args.workers, args.batches,
                                           warmup=3)
    step_s, info = bare_step_seconds(["data=shapes", "data.num_train=256", f"data.image_size={args.size}",
                                      f"data.batch_size={args.batch_size}", "net=tiny", "trainer=cpu"],
                                     steps=args.steps, warmup=2)
    train_rate = args.batch_size / step_s
    result = {"data_images_per_s": round(data_rate, 1), "train_images_per_s": round(train_rate, 1),
              "ratio_data_over_train": round(data_rate / train_rate, 2), "shards": shards, "images": args.images,
              "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
              "cpu_threads": torch.get_num_threads(), "train": info}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
