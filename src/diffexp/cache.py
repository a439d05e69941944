"""The on-disk cache for derived data (reference features, encoded latents): location, keys, atomic writes."""
from __future__ import annotations

import hashlib
import os
from itertools import chain
from pathlib import Path

import torch
from torch import nn


def default_cache_dir() -> Path:
    """``$DIFFEXP_CACHE`` or ``~/.cache/diffexp``."""
    return Path(os.environ.get("DIFFEXP_CACHE", Path.home() / ".cache" / "diffexp")).expanduser()


def tensor_fingerprint(*tensors: torch.Tensor, names: list[str] | None = None) -> str:
    """First 10 hex digits of a SHA-1 over the tensors' bytes (and optional names)."""
    digest = hashlib.sha1()
    for i, tensor in enumerate(tensors):
        if names is not None:
            digest.update(names[i].encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:10]


def weights_fingerprint(module: nn.Module) -> str:
    """:func:`tensor_fingerprint` over the module's parameters and buffers (frozen modules included)."""
    named = list(chain(module.named_parameters(), module.named_buffers()))
    return tensor_fingerprint(*[t for _, t in named], names=[n for n, _ in named])


def cached_tensor(path: Path, compute) -> torch.Tensor:
    """The tensor saved at ``path``, or ``compute()`` saved there atomically (concurrent jobs never read
    a half-written file)."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    tmp.replace(path)
    return value
