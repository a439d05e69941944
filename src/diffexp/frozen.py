"""A base for frozen pretrained modules (text encoders, autoencoders) used inside trainable models."""
from __future__ import annotations

from torch import nn


class Frozen(nn.Module):
    """Always in eval mode, no gradients, and left out of checkpoints: its weights come from their own
    files (named in the run config), not from the checkpoint of the model that uses it.

    Subclasses call :meth:`freeze` once their weights are loaded.
    """

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)
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
        return {}

    def _load_from_state_dict(self, *args, **kwargs):
        return None
