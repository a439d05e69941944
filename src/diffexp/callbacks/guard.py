"""Stopping a diverged run before it writes non-finite weights."""
from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from diffexp.checkpoints import non_finite_tensors


class DivergenceError(RuntimeError):
    """Training produced NaN or inf; the run stops without writing a checkpoint."""


class DivergenceGuard(Callback):
    """Stops training when the loss or the weights become NaN/inf, and never lets a non-finite checkpoint be written.

    Each step ORs "loss not finite" into a flag on the device (no host sync per step); the flag is read every
    ``check_every_n_steps`` steps (default: the trainer's ``log_every_n_steps``) and before every checkpoint,
    when the weights (and EMA weights) are checked too. On failure it raises :class:`DivergenceError`, naming
    the step and the last checkpoint written (the last good one).
    """

    def __init__(self, check_every_n_steps: int | None = None):
        if check_every_n_steps is not None and check_every_n_steps <= 0:
            raise ValueError(f"callbacks.divergence_guard.check_every_n_steps must be positive, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._bad: torch.Tensor | None = None
        self._first_bad_step: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.bool, device=bad.device)
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
        self._first_bad_step = torch.where(bad & ~self._bad, trainer.global_step, self._first_bad_step)  # no host copy
        self._bad |= bad
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self.check_loss(trainer)

    def last_good_checkpoint(self, trainer) -> str | None:
        paths = [cb.last_model_path or cb.best_model_path for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        return next((p for p in paths if p), None)

    def fail(self, trainer, what: str) -> None:
        last = self.last_good_checkpoint(trainer)
        raise DivergenceError(
            f"training diverged: {what}. The run was stopped and no checkpoint with non-finite weights was written; "
            f"the last checkpoint written is {last or 'none (nothing was saved before)'}. Lower model.optimizer.lr, "
            f"add warm-up (model.lr_scheduler.warmup_steps) or gradient clipping (trainer.gradient_clip_val)")

    def check_loss(self, trainer) -> None:
        if self._bad is None:
            return
        bad = self._bad
        if trainer.world_size > 1:  # every rank stops together (one raising alone would hang the others)
            bad = trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        if bool(bad):
            step = int(self._first_bad_step) if bool(self._bad) else -1
            self.fail(trainer, f"the training loss was NaN/inf at step {step}" if step >= 0 else
                      "the training loss was NaN/inf on another rank")

    def on_train_end(self, trainer, pl_module) -> None:
        """The last steps after the last check: no NaN weights are exported or reported as a success."""
        self.check_loss(trainer)
        bad = [name for name, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self.fail(trainer, f"{len(bad)} weight tensors hold NaN/inf at the end of training (e.g. {bad[0]})")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.check_loss(trainer)
        bad = non_finite_tensors(checkpoint["state_dict"])
        for key, state in checkpoint.get("callbacks", {}).items():
            if isinstance(state, dict) and isinstance(state.get("ema_state"), dict):
                bad += [f"EMA {k}" for k in non_finite_tensors(state["ema_state"])]
        if bad:
            self.fail(trainer, f"{len(bad)} weight tensors hold NaN/inf at step {trainer.global_step} "
                               f"(e.g. {', '.join(bad[:3])})")
