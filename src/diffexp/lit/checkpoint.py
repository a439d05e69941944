"""Reading the checkpoints train.py writes: each carries its composed run config under CONFIG_KEY."""
from __future__ import annotations

from pathlib import Path

import torch

CONFIG_KEY = "diffexp_config"


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict:
    """The checkpoint dict at ``path``; a clear error (naming ``option``) if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}={str(path)!r} does not exist; pass a checkpoint written by train.py, "
                                f"e.g. {option}=logs/train/latest/checkpoints/last.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if CONFIG_KEY not in checkpoint:
        raise ValueError(f"{option}={str(path)!r} carries no diffexp config (key {CONFIG_KEY!r}); "
                         f"was it written by train.py?")
    return checkpoint
