"""What every diffexp LightningModule shares: the optimizer and LR schedule from config, the run config in
every checkpoint."""
from __future__ import annotations

from functools import partial
from typing import Callable

import lightning as L
import torch

from diffexp.checkpoints import CONFIG_KEY, FORMAT, FORMAT_KEY


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr * min(1, (step + 1) / warmup_steps): a linear warm-up, then constant
    (``model.lr_scheduler=...``, a partial called with the optimizer)."""
    if warmup_steps < 0:
        raise ValueError(f"model.lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


class TrainingModule(L.LightningModule):
    """Base: ``optimizer`` (a partial taking the trainable parameters) and ``lr_scheduler`` (a partial taking
    the optimizer, stepped every optimizer step); ``run_config`` (the composed config) is saved in every
    checkpoint with the checkpoint format version."""

    def __init__(self, optimizer: Callable | None = None, lr_scheduler: Callable | None = None):
        super().__init__()
        lr = getattr(optimizer, "keywords", {}).get("lr") if optimizer is not None else None
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"model.optimizer.lr must be a positive number, got {lr!r}")
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=2e-4)
        self.lr_scheduler_factory = lr_scheduler or linear_warmup
        self.run_config: dict | None = None

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        checkpoint[FORMAT_KEY] = FORMAT
