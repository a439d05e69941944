"""Checkpoint files that survive a kill at any moment and load without running code (a Lightning CheckpointIO)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffexp.checkpoints import load_file

TEMP_MARK = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace: ``path`` is either the old file
    or the complete new one, whatever moment the process is killed (a temp file in another filesystem, such
    as $TMPDIR on tmpfs, would make the final move a copy that a kill can truncate)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files left in ``directory`` by writers that were killed (not this process's)."""
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_MARK}*"):
        if not tmp.name.endswith(f"{TEMP_MARK}{os.getpid()}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes with :func:`atomic_torch_save` (cleaning up temp files of earlier crashes in the directory) and
    reads with ``weights_only=True`` (:func:`diffexp.checkpoints.load_file`): no code runs on resume."""

    def __init__(self):
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        directory = Path(path).parent
        if directory not in self._cleaned and directory.is_dir():
            remove_stale_temp_files(directory)
            self._cleaned.add(directory)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_file(path, "ckpt_path")
