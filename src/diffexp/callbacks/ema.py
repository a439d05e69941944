"""Exponential moving average of the weights, kept in the checkpoint and swapped in for evaluation."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class EMA(Callback):
    """ema <- d * ema + (1 - d) * w after every optimizer step.

    With ``warmup`` the decay ramps up as d_n = min(decay, (1 + n) / (10 + n)) after n updates,
    so early averages are not dominated by the random initialisation.
    The averaged weights are swapped into the module for validation (and for whoever enters
    :meth:`swapped`, e.g. the sampling and FID callbacks); the raw weights are restored after.
    DDP keeps the weights equal on every rank, so each rank's average is the same.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, validate_with_ema: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup, self.validate_with_ema = decay, warmup, validate_with_ema
        self.num_updates = 0
        self.ema_state: dict[str, torch.Tensor] | None = None
        self._backup: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _tracked(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The trainable parameters by state-dict name (buffers such as a latent scale are not averaged)."""
        return {k: v for k, v in pl_module.named_parameters() if v.requires_grad}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def on_fit_start(self, trainer, pl_module) -> None:
        tracked = self._tracked(pl_module)
        # the live parameters: looked up once, not every step
        self._live = tracked
        if self.ema_state is None:
            self.ema_state = {k: v.detach().clone() for k, v in tracked.items()}
        else:  # restored from a checkpoint
            self.ema_state = {k: v.to(tracked[k].device) for k, v in self.ema_state.items() if k in tracked}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        d = self.current_decay()
        tracked = getattr(self, "_live", None) or self._tracked(pl_module)
        keys = list(self.ema_state)
        torch._foreach_lerp_([self.ema_state[k] for k in keys], [tracked[k] for k in keys], 1.0 - d)
        self.num_updates += 1

    @contextmanager
    def swapped(self, pl_module: L.LightningModule):
        """Within the block the module holds the averaged weights (no-op before training starts)."""
        if self.ema_state is None or self._backup is not None:
            yield
            return
        self._backup = {k: v.detach().clone() for k, v in self._tracked(pl_module).items()}
        pl_module.load_state_dict(self.ema_state, strict=False)
        try:
            yield
        finally:
            pl_module.load_state_dict(self._backup, strict=False)
            self._backup = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validate_with_ema and not trainer.sanity_checking:
            self._ctx = self.swapped(pl_module)
            self._ctx.__enter__()

    def on_validation_end(self, trainer, pl_module) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            self._ctx = None
            ctx.__exit__(None, None, None)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._backup is not None:  # never save averaged weights as the raw ones
            checkpoint["state_dict"].update({k: v.clone() for k, v in self._backup.items()})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "ema_state": self.ema_state}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        self.ema_state = state["ema_state"]


def find_ema(trainer) -> EMA | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


def ema_weights(trainer, pl_module):
    """Context manager: the EMA weights if an :class:`EMA` callback is active, else the raw ones."""
    ema = find_ema(trainer)
    return ema.swapped(pl_module) if ema is not None else nullcontext()


def ema_state_from_checkpoint(checkpoint: dict) -> dict[str, torch.Tensor] | None:
    """The averaged module state saved by :class:`EMA` in a Lightning checkpoint, if any."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("EMA") and isinstance(state, dict) and state.get("ema_state") is not None:
            return state["ema_state"]
    return None
