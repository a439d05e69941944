"""A base for frozen pretrained modules (text encoders, autoencoders) used inside trainable models."""
from __future__ import annotations

import os

from torch import nn


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for local files only (what ``local_files_only: null`` follows)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


class Frozen(nn.Module):
    """Always in eval mode, no gradients. By default left out of checkpoints: its weights come from their own
    files (named in the run config), not from the checkpoint of the model that uses it. A subclass that sets
    ``in_checkpoint = True`` (a small model trained here) is saved with the model that uses it, so that
    checkpoint needs no other file.

    Subclasses call :meth:`freeze` once their weights are loaded.
    """

    in_checkpoint = False

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)
        if not self.in_checkpoint:
            self._register_load_state_dict_pre_hook(self._remember_prefix)
            self.register_load_state_dict_post_hook(self._forgive_missing)

    def _remember_prefix(self, state_dict, prefix, *args) -> None:
        self._load_prefix = prefix

    @staticmethod
    def _forgive_missing(module, incompatible_keys) -> None:
        """Our weights are absent from checkpoints by design: not a missing key."""
        prefix = getattr(module, "_load_prefix", "")
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and norm statistics stay off

    def state_dict(self, *args, **kwargs):
        return super().state_dict(*args, **kwargs) if self.in_checkpoint else {}

    def _load_from_state_dict(self, *args, **kwargs):
        if self.in_checkpoint:
            return super()._load_from_state_dict(*args, **kwargs)
        return None
