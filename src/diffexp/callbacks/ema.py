"""Exponential moving average of the weights, kept in the checkpoint and swapped in for evaluation; optionally
EDM2's power-function profiles with periodic snapshots for post-hoc EMA (:mod:`diffexp.posthoc`)."""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from diffexp.posthoc import power_beta, sigma_rel_to_gamma

SNAPSHOT_DIR = "ema_snapshots"  # in the run directory


def profile_prefix(sigma_rel: float) -> str:
    """The key prefix of one profile's tensors in a snapshot file."""
    return f"sigma_rel={sigma_rel:g}/"


def snapshot_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.safetensors"


class EMA(Callback):
    """ema <- d * ema + (1 - d) * w after every optimizer step.

    With ``warmup`` the decay ramps up as d_n = min(decay, (1 + n) / (10 + n)) after n updates,
    so early averages are not dominated by the random initialisation.
    The averaged weights are swapped into the module for validation (and for whoever enters
    :meth:`swapped`, e.g. the sampling and FID callbacks); the raw weights are restored after.
    DDP keeps the weights equal on every rank, so each rank's average is the same.

    With ``posthoc`` it also keeps EDM2's power-function EMAs (Karras et al. 2024), one per ``sigma_rels`` value
    (beta_t = (1 - 1/t)^(gamma + 1) after update t), and every ``snapshot_every`` updates writes them to
    ``RUN/ema_snapshots/step_<t>.safetensors`` (rank 0), and at the end of training; ``python -m diffexp.ema RUN --sigma-rel ...`` then
    reconstructs any EMA length. Both kinds of state are in the checkpoint and resume bit-identically.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, validate_with_ema: bool = True,
                 posthoc: bool = False, sigma_rels=(0.05, 0.10), snapshot_every: int = 100):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup, self.validate_with_ema = decay, warmup, validate_with_ema
        self.posthoc = bool(posthoc)
        self.sigma_rels = [float(v) for v in sigma_rels] if posthoc else []
        if posthoc:
            if len(self.sigma_rels) < 1 or len(set(self.sigma_rels)) != len(self.sigma_rels):
                raise ValueError(f"callbacks.ema.sigma_rels must list distinct EMA lengths (EDM2: [0.05, 0.1]), got "
                                 f"{list(sigma_rels)}")
            for value in self.sigma_rels:
                try:
                    sigma_rel_to_gamma(value)
                except ValueError as e:
                    raise ValueError(f"callbacks.ema.sigma_rels: {e}") from None
            if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
                raise ValueError(f"callbacks.ema.snapshot_every must be a positive number of steps, got "
                                 f"{snapshot_every!r}")
        self.gammas = [sigma_rel_to_gamma(v) for v in self.sigma_rels]
        self.snapshot_every = snapshot_every
        self.num_updates = 0
        self.ema_state: dict[str, torch.Tensor] | None = None
        self.posthoc_state: list[dict[str, torch.Tensor]] | None = None
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
        if self.posthoc:
            if self.posthoc_state is None:
                self.posthoc_state = [{k: v.detach().clone() for k, v in tracked.items()} for _ in self.sigma_rels]
            else:
                self.posthoc_state = [{k: v.to(tracked[k].device) for k, v in state.items() if k in tracked}
                                      for state in self.posthoc_state]
            self._snapshot_dir = Path(trainer.default_root_dir) / SNAPSHOT_DIR

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        d = self.current_decay()
        tracked = getattr(self, "_live", None) or self._tracked(pl_module)
        keys = list(self.ema_state)
        torch._foreach_lerp_([self.ema_state[k] for k in keys], [tracked[k] for k in keys], 1.0 - d)
        self.num_updates += 1
        if self.posthoc:
            t = self.num_updates
            for gamma, state in zip(self.gammas, self.posthoc_state):
                torch._foreach_lerp_([state[k] for k in keys], [tracked[k] for k in keys], 1.0 - power_beta(gamma, t))
            if t % self.snapshot_every == 0 and trainer.is_global_zero:
                self.write_snapshot(self._snapshot_dir, t)

    def on_train_end(self, trainer, pl_module) -> None:
        """The last update's power EMAs as a snapshot too (the reconstruction's default step is the run's end)."""
        if self.posthoc and self.num_updates % self.snapshot_every and trainer.is_global_zero:
            self.write_snapshot(self._snapshot_dir, self.num_updates)

    def write_snapshot(self, directory: Path, step: int) -> Path:
        """The power EMAs after update ``step`` as one safetensors file (atomic; a resumed run rewrites a step's
        file with the same values)."""
        from safetensors.torch import save_file

        from diffexp.checkpoints import atomic_write

        tensors = {profile_prefix(v) + k: t.detach().cpu().contiguous()
                   for v, state in zip(self.sigma_rels, self.posthoc_state) for k, t in state.items()}
        metadata = {"step": str(step), "sigma_rels": json.dumps(self.sigma_rels)}
        directory.mkdir(parents=True, exist_ok=True)
        return atomic_write(snapshot_path(directory, step), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

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
        state = {"decay": self.decay, "num_updates": self.num_updates, "ema_state": self.ema_state}
        if self.posthoc:
            state.update(sigma_rels=self.sigma_rels, posthoc_state=self.posthoc_state)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        self.ema_state = state["ema_state"]
        if self.posthoc:
            if state.get("posthoc_state") is None:
                raise ValueError("callbacks.ema.posthoc=true, but the checkpoint resumed from has no power-function EMAs "
                                 "(its run had posthoc=false): they cannot start mid-run; resume with posthoc=false or "
                                 "start a new run")
            if [float(v) for v in state["sigma_rels"]] != self.sigma_rels:
                raise ValueError(f"callbacks.ema.sigma_rels={self.sigma_rels}, but the checkpoint's run tracked "
                                 f"{state['sigma_rels']}: resume with the run's own values")
            self.posthoc_state = state["posthoc_state"]


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
