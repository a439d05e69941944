"""One interface for text encoders: captions in, token embeddings + mask + pooled vector out."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEmbedding:
    """``tokens`` (N, L, D), ``mask`` (N, L) bool (True = real token), ``pooled`` (N, D)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def as_kwargs(self) -> dict:
        """Keyword arguments for :class:`diffexp.nets.UNet`."""
        return {"context": self.tokens, "context_mask": self.mask, "pooled": self.pooled}


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real (mask=True) token vectors; zeros for an all-padding row."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1)


class TextEncoder(nn.Module):
    """Base class. Subclasses set ``dim`` and ``trainable`` and implement :meth:`encode`.

    ``forward(captions)`` returns a :class:`TextEmbedding`. The empty caption ``""`` is the
    unconditional input used for classifier-free guidance.
    """

    dim: int
    trainable: bool = False

    def encode(self, captions: list[str]) -> TextEmbedding:
        raise NotImplementedError

    def forward(self, captions: list[str]) -> TextEmbedding:
        if isinstance(captions, str):
            captions = [captions]
        return self.encode(list(captions))

    @property
    def needs_vocabulary(self) -> bool:
        """True while a tokenizer built from the data has not been built yet (never for pretrained ones)."""
        return False

    def fit_vocabulary(self, captions) -> None:
        """Hook for encoders whose tokenizer is built from the data (no-op for pretrained ones)."""
