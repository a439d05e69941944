"""What every diffexp LightningModule shares: the optimizer and LR schedule from config, the run config in
every checkpoint."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import lightning as L
import torch

from diffexp.checkpoints import CONFIG_KEY, FORMAT, FORMAT_KEY
from diffexp.registry import register_part

for _optimizer in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):  # the optimizers configs name
    register_part(_optimizer)


@register_part
def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr * min(1, (step + 1) / warmup_steps): a linear warm-up, then constant
    (``model.lr_scheduler=...``, a partial called with the optimizer)."""
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"model.lr_scheduler.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def fused_option(factory: Callable, params: list[torch.Tensor]) -> dict:
    """``{"fused": True}`` for torch's Adam/AdamW when every parameter is on a CUDA device and the config does not
    set ``fused`` or ``foreach`` itself (one kernel for the whole update instead of one per tensor group)."""
    func = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {})
    if func not in (torch.optim.Adam, torch.optim.AdamW) or "fused" in keywords or "foreach" in keywords:
        return {}
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


@register_part
def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 1000,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr * min(1, (step + 1) / warmup_steps) during warm-up, then cosine decay (Loshchilov & Hutter
    2017): lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2) with p = (step - warmup) / (total - warmup)
    going from 0 to 1 at ``total_steps`` (and staying there after)."""
    for option, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"model.lr_scheduler.{option} must be an integer number of optimizer steps, got {value!r}")
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"model.lr_scheduler: need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps} (total_steps follows trainer.max_steps; for an epoch-bounded run "
                         f"set model.lr_scheduler.total_steps yourself)")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"model.lr_scheduler.min_ratio must be a number in [0, 1], got {min_ratio!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        # bad schedule settings fail when the model is built, not when training starts
        self.lr_scheduler_factory(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
        self.run_config: dict | None = None

    def configure_model(self) -> None:
        """Under ``trainer=fsdp``: shard the trained net over the processes (:meth:`FullyShardedStrategy.shard`)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "shard"):
            if not isinstance(getattr(self, "net", None), torch.nn.Module):
                raise ValueError(f"trainer=fsdp shards a model's denoiser net; {type(self).__name__} has none "
                                 f"(use trainer=ddp)")
            strategy.shard(self.net)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        scaled = self._trainer is not None and str(self.trainer.precision).startswith("16")  # fp16: a GradScaler
        optimizer = self.optimizer_factory(params, **({} if scaled else fused_option(self.optimizer_factory, params)))
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping; a fused optimizer without a gradient scaler (fp32, bf16) is clipped here
        directly, since Lightning's mixed-precision plugin refuses every fused optimizer (one that unscales
        fp16 gradients itself could not be clipped first; without a scaler there is nothing to unscale)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint[CONFIG_KEY] = self.run_config
        checkpoint[FORMAT_KEY] = FORMAT
