"""Checkpoint files that survive a kill at any moment and load without running code (a Lightning CheckpointIO)."""
from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffexp.checkpoints import TEMP_MARK, atomic_torch_save, load_file


def writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files left in ``directory`` by writers that were killed: those whose process (the pid in
    the name) no longer runs; a live writer's file is left alone."""
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_MARK}*"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[1]
        if not pid.isdigit() or not writer_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes with :func:`atomic_torch_save` (cleaning up temp files of earlier crashes in the directory) and
    reads with ``weights_only=True`` (:func:`diffexp.checkpoints.load_file`): no code runs on resume."""

    def __init__(self):
        super().__init__()
        self._cleaned: set[Path] = set()
        self._preloaded: tuple[Path, dict] | None = None

    def preload(self, path, checkpoint: dict) -> None:
        """Hand over a checkpoint already read (and checked) from ``path``: its next load is not read twice."""
        self._preloaded = (Path(path).resolve(), checkpoint)

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
        if self._preloaded is not None and self._preloaded[0] == Path(path).resolve():
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        return load_file(path, "ckpt_path")
