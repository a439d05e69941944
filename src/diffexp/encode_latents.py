"""``python -m diffexp.encode_latents data=... vae=... out=DIR``: every image of a dataset's splits encoded once by a
frozen autoencoder into latent shards (:mod:`diffexp.data.latent_shards`), with a progress bar.

The images are read in file order without augmentation. Each shard is written to a temporary name and renamed
when complete, so a run stopped at any point is resumed by the same command: it checks that data and
autoencoder are the ones of the manifest, keeps the complete shards and encodes from the first missing one.
"""
from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffexp.data.latent_shards import MANIFEST, shard_name


def batches(items, size: int):
    """Lists of ``size`` items (the last may be shorter)."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def write_shard(out: Path, split: str, index: int, mean: torch.Tensor, logvar: torch.Tensor | None,
                labels: list | None, captions: list | None) -> None:
    """One shard's tensors and captions, each under a temporary name first (the .safetensors last: its presence
    marks the shard complete)."""
    from safetensors.torch import save_file

    name = shard_name(split, index)
    tensors = {"mean": mean.contiguous()}
    if logvar is not None:
        tensors["logvar"] = logvar.contiguous()
    if labels is not None:
        tensors["label"] = torch.as_tensor(labels, dtype=torch.long)
    meta = out / f"{name}.json"
    (out / f"{name}.json.tmp").write_text(json.dumps({"count": len(mean), "captions": captions}))
    (out / f"{name}.json.tmp").replace(meta)
    save_file(tensors, str(out / f"{name}.safetensors.tmp"))
    (out / f"{name}.safetensors.tmp").replace(out / f"{name}.safetensors")


def complete_shards(out: Path, split: str) -> int:
    """How many consecutive shards of ``split`` are complete (from the first)."""
    index = 0
    while (out / f"{shard_name(split, index)}.safetensors").is_file():
        index += 1
    return index


def check_manifest(out: Path, manifest: dict) -> None:
    """Refuse to add to a directory encoded from other data or with another autoencoder."""
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"out={str(out)!r} exists and holds files but no {MANIFEST}; choose an empty or new "
                                  f"directory (nothing there is overwritten)")
        return
    before = json.loads(path.read_text())
    keys = ("data", "vae_fingerprint", "shard_size", "image_size", "channels")
    changed = [k for k in keys if before.get(k) != manifest.get(k)]
    if changed:
        raise ValueError(f"out={str(out)!r} was encoded with other {changed} ({MANIFEST}); use a new out= directory "
                         f"(nothing there is overwritten)")


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    from tqdm import tqdm

    from diffexp.api import resolve_device
    from diffexp.cache import weights_fingerprint
    from diffexp.config import check_number

    if cfg.vae is None or "_target_" not in cfg.vae:
        raise ValueError("vae= is required: the autoencoder to encode with (vae=own vae.ckpt=PATH | "
                         "vae=sd_vae_ft_mse | vae=taesd)")
    check_number("shard_size", cfg.shard_size, integer=True, positive=True)
    check_number("batch_size", cfg.batch_size, integer=True, positive=True)
    splits = list(cfg.splits)
    if not splits or any(s not in ("train", "val") for s in splits) or "train" not in splits:
        raise ValueError(f"splits={splits}; allowed: [train] or [train, val]")
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if "random_flip" in data_cfg:
        data_cfg["random_flip"] = False  # encode the images as they are
    datamodule = instantiate(data_cfg)
    device = resolve_device(cfg.device)
    autoencoder = instantiate(cfg.vae).to(device).eval()
    autoencoder.check_image_size(datamodule.image_size)
    out = Path(cfg.out).expanduser()
    manifest = {"data": data_cfg, "data_name": datamodule.name, "image_size": datamodule.image_size,
                "channels": datamodule.channels, "num_classes": datamodule.num_classes,
                "vae": OmegaConf.to_container(cfg.vae, resolve=True), "vae_name": autoencoder.name,
                "vae_fingerprint": weights_fingerprint(autoencoder), "shard_size": cfg.shard_size,
                "latent_channels": autoencoder.latent_channels, "scaling_factor": autoencoder.scaling_factor,
                "shift_factor": autoencoder.shift_factor, "complete": False}
    check_manifest(out, manifest)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for stale in out.glob("*.tmp"):
        stale.unlink()
    counts = {}
    for split in splits:
        if split == "val" and hasattr(datamodule, "shards") and not datamodule.shards("val"):
            print(f"[diffexp] {datamodule.name} has no held-out split: no val written", flush=True)
            continue
        done = complete_shards(out, split)
        count = sum(json.loads((out / f"{shard_name(split, i)}.json").read_text())["count"] for i in range(done))
        total = len(datamodule.dataset(split)) if not hasattr(datamodule, "shards") else None
        bar = tqdm(total=total, initial=min(count, total or count), desc=f"encoding {split}", unit="img",
                   disable=not cfg.progress, file=sys.stderr)
        items = datamodule.iter_items(split)
        for _ in islice(items, count):  # resume: these are in the complete shards
            pass
        for index, shard_items in enumerate(batches(items, cfg.shard_size), start=done):
            means, logvars = [], []
            for chunk in batches(shard_items, cfg.batch_size):
                mean, logvar = autoencoder.encode_moments(torch.stack([it["image"] for it in chunk]).to(device))
                means.append(mean.float().cpu())
                logvars.append(None if logvar is None else logvar.float().cpu())
                bar.update(len(chunk))
            labels = [int(it["label"]) for it in shard_items] if "label" in shard_items[0] else None
            captions = [it["caption"] for it in shard_items] if "caption" in shard_items[0] else None
            write_shard(out, split, index, torch.cat(means), None if logvars[0] is None else torch.cat(logvars),
                        labels, captions)
            count += len(shard_items)
        bar.close()
        counts[split] = count
    manifest.update(complete=True, counts=counts)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print(f"[diffexp] encoded {counts} into {out}; train on them with latents={out}", flush=True)
    return counts


if __name__ == "__main__":
    from diffexp.config import run_module_app

    run_module_app("encode_latents", run)
