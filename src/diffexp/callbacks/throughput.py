"""Training speed as the whole loop delivers it: images/s in the logs and a steady-state figure per run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from diffexp.data.base import batch_size_of


class Throughput(Callback):
    """Logs ``train/images_per_second`` every ``log_every_n_steps`` optimizer steps, from the host clock (no
    GPU synchronisation per step: the figure averages over the interval), and writes ``throughput.json`` to
    the run directory at the end: optimizer steps per second from step ``skip_steps`` (after compilation and
    warm-up) to the last training step (``trainer.max_steps``; else the end of training), synchronised at both
    ends, so it includes everything the loop does between them -- data loading, EMA, logging, and the grids,
    FID, validation and checkpoints at their configured intervals -- but not the one-off work after the last
    step (final grids, validation, checkpoint).
    Wall-clock stamps (``time.time()``) of the fit start, the first step's start and end and the end of training
    are kept for start-up accounting.
    """

    def __init__(self, skip_steps: int = 20):
        if not isinstance(skip_steps, int) or skip_steps < 0:
            raise ValueError(f"callbacks.throughput.skip_steps must be a non-negative integer, got {skip_steps!r}")
        self.skip_steps = skip_steps
        self.stamps: dict[str, float] = {}
        self._window: tuple[int, float] | None = None
        self._start: tuple[int, float] | None = None
        self._end: tuple[int, float] | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.stamps["fit_start"] = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.setdefault("first_step", time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if "first_step_end" not in self.stamps:  # the first step compiles / autotunes: its length, synchronised
            self._sync(pl_module)
            self.stamps["first_step_end"] = time.time()
        if self._start is None and step >= self.skip_steps:
            self._sync(pl_module)
            self._start = (step, time.perf_counter())
        every = max(1, trainer.log_every_n_steps)
        if self._window is None:
            self._window = (step, now)
        elif step % every == 0 and step > self._window[0]:
            images = (step - self._window[0]) * batch_size_of(batch) * trainer.world_size * trainer.accumulate_grad_batches
            pl_module.log("train/images_per_second", images / (now - self._window[1]), on_step=True, on_epoch=False)
            self._window = (step, now)
        if 0 < trainer.max_steps <= step and self._end is None:  # the last step: stop the clock before end-of-run work
            self._sync(pl_module)
            self._end = (step, time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.stamps["train_end"] = time.time()
        if self._start is None or (self._end or (trainer.global_step,))[0] <= self._start[0]:
            rank_zero_warn(f"callbacks.throughput: the run ended at step {trainer.global_step}, before a steady-state "
                           f"window after skip_steps={self.skip_steps}; no throughput.json written (lower skip_steps)")
            return
        if not trainer.is_global_zero:
            return
        end_step, end_time = self._end or (trainer.global_step, time.perf_counter())
        steps, seconds = end_step - self._start[0], end_time - self._start[1]
        result = {"from_step": self._start[0], "steps": steps, "seconds": round(seconds, 3),
                  "steps_per_second": round(steps / seconds, 4) if seconds > 0 else None, "stamps": self.stamps,
                  "world_size": trainer.world_size, "precision": str(trainer.precision)}
        path = Path(trainer.default_root_dir) / "throughput.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
