"""Latents encoded once into shards (``python -m diffexp.encode_latents``) and the datamodule that trains on them
(``python train.py ... latents=DIR``).

A directory holds ``latents.json`` (what was encoded: data, autoencoder and its fingerprint, counts) and per split
``SPLIT-000000.safetensors`` (``mean`` and, for a VAE, ``logvar`` of the posterior q(latent | x) =
N(mean, diag(exp(logvar))), ``label`` when labelled) with ``SPLIT-000000.json`` (captions). Training draws
latent = mean + exp(logvar / 2) * eps afresh at every step (:meth:`diffexp.spaces.LatentSpace.from_batch`), as
LDM samples its first-stage posterior, so the stored Gaussian is not collapsed to its mean.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffexp.data.base import ImageDataModule
from diffexp.registry import register_part

MANIFEST = "latents.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def read_manifest(root: str | Path) -> dict:
    """The manifest of an encoded-latents directory; a clear error when it is not one or is incomplete."""
    path = Path(root).expanduser() / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"latents={str(root)!r} holds no {MANIFEST}: write it with `python -m "
                                f"diffexp.encode_latents data=... vae=... out=DIR`")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise ValueError(f"latents={str(root)!r} is only partly encoded; run the same `python -m "
                         f"diffexp.encode_latents ... out={root}` again to finish it")
    return manifest


class LatentShardDataset(Dataset):
    """The items of one split's shards: {"latent": mean, "latent_logvar"?, "label"?, "caption"?}, held in memory
    (float32 mean and logvar of a 256px image under SD's VAE: 32 KB)."""

    def __init__(self, root: Path, split: str, count: int, shard_size: int):
        from safetensors.torch import load_file

        shards = -(-count // shard_size)
        tensors = [load_file(root / f"{shard_name(split, i)}.safetensors") for i in range(shards)]
        self.mean = torch.cat([t["mean"] for t in tensors]) if tensors else torch.empty(0)
        self.logvar = torch.cat([t["logvar"] for t in tensors]) if tensors and "logvar" in tensors[0] else None
        self.labels = torch.cat([t["label"] for t in tensors]) if tensors and "label" in tensors[0] else None
        captions = [json.loads((root / f"{shard_name(split, i)}.json").read_text()).get("captions")
                    for i in range(shards)]
        self.captions = None if not captions or captions[0] is None else [c for part in captions for c in part]
        if len(self.mean) != count:
            raise ValueError(f"{root}: the {split} shards hold {len(self.mean)} latents, the manifest says {count}")

    def __len__(self) -> int:
        return len(self.mean)

    def head(self, n: int) -> "LatentShardDataset":
        """The first ``n`` items (a view of the same tensors)."""
        head = object.__new__(LatentShardDataset)
        head.mean = self.mean[:n]
        head.logvar = None if self.logvar is None else self.logvar[:n]
        head.labels = None if self.labels is None else self.labels[:n]
        head.captions = None if self.captions is None else self.captions[:n]
        return head

    def __getitem__(self, i: int) -> dict:
        return self.batch([i], single=True)

    def batch(self, indices: list[int], single: bool = False) -> dict:
        index = indices[0] if single else torch.as_tensor(indices)
        item = {"latent": self.mean[index]}
        if self.logvar is not None:
            item["latent_logvar"] = self.logvar[index]
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index] if single else [self.captions[i] for i in indices]
        return item

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.mean, self.logvar, self.labels) if t is not None)

    def to(self, device) -> "LatentShardDataset":
        self.mean = self.mean.to(device)
        self.logvar = self.logvar.to(device) if self.logvar is not None else None
        self.labels = self.labels.to(device) if self.labels is not None else None
        return self


@register_part
class LatentShardsDataModule(ImageDataModule):
    """Training on encoded latents (see the module docstring). Sizes, classes and the data's name are the encoded
    data's; the batch size and workers are the run's. The items carry no images: image grids of real data are
    skipped and FID against the data needs the data itself."""

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        super().__init__(image_size=self.manifest["image_size"], channels=self.manifest["channels"],
                         batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.name = self.manifest["data_name"]
        self.num_classes = self.manifest.get("num_classes")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        counts, shard_size = self.manifest["counts"], self.manifest["shard_size"]
        self.train_set = LatentShardDataset(self.root, "train", counts["train"], shard_size)
        if counts.get("val"):
            self.val_set = LatentShardDataset(self.root, "val", counts["val"], shard_size)
        else:  # no held-out latents: validate on the first 256 training ones
            self.val_set = self.train_set.head(256)
