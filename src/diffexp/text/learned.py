"""A small text encoder trained jointly with the U-Net; its word vocabulary is built from the data."""
from __future__ import annotations

import re

import torch
from torch import nn

from diffexp.text.base import TextEmbedding, TextEncoder, mean_pool
from diffexp.registry import register_part

PAD, UNK, EMPTY = "<pad>", "<unk>", "<empty>"


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


@register_part
class LearnedTextEncoder(TextEncoder):
    """Word embeddings + learned positions + a few transformer encoder layers.

    The vocabulary (at most ``max_vocab`` words) is set by :meth:`fit_vocabulary` from the
    training captions before training and saved with the weights (extra state), so a
    checkpoint carries its tokenizer. The empty caption becomes one ``<empty>`` token.
    """

    trainable = True

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 16, max_vocab: int = 512):
        super().__init__()
        self.dim, self.max_length, self.max_vocab = dim, max_length, max_vocab
        self.vocab: list[str] = [PAD, UNK, EMPTY]
        self.embed = nn.Embedding(max_vocab, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @property
    def needs_vocabulary(self) -> bool:
        return len(self.vocab) <= 3

    def fit_vocabulary(self, captions) -> None:
        found = sorted({w for c in captions for w in words(c)})
        if len(found) + 3 > self.max_vocab:
            raise ValueError(f"text_encoder.max_vocab={self.max_vocab} is too small for {len(found)} distinct words")
        self.vocab = [PAD, UNK, EMPTY, *found]

    def extend_vocabulary(self, captions) -> list[str]:
        """Append the words of ``captions`` not yet in the vocabulary (sorted) after the existing ones, so every
        existing word keeps its id and its embedding; returns the words added. Fine-tuning on captions with a
        new word uses this: the word gets a row of the embedding table of its own (it was ``<unk>`` before),
        initialised by :meth:`initialise_rows`."""
        added = self.unknown_words(captions)
        if len(self.vocab) + len(added) > self.max_vocab:
            raise ValueError(f"text_encoder.max_vocab={self.max_vocab} is too small to add {len(added)} words to the "
                             f"{len(self.vocab)} the checkpoint knows (the embedding table cannot grow)")
        first = len(self.vocab)
        self.vocab = [*self.vocab, *added]
        self.initialise_rows(first)
        return added

    def unknown_words(self, captions) -> list[str]:
        """The words of ``captions`` this vocabulary does not hold (each is read as ``<unk>``)."""
        known = set(self.vocab)
        return sorted({w for c in captions for w in words(c)} - known)

    @torch.no_grad()
    def initialise_rows(self, first: int) -> None:
        """Set the embeddings of the words from id ``first`` on to the mean embedding of the known words (ids 3 to
        first - 1), as ``transformers`` initialises added tokens: a new word starts as an average word, not as a
        random vector like the never-trained ``<unk>``. Deterministic from the known rows, so a LoRA adapter
        (which does not store the table) gets the same rows back on its base model."""
        table = getattr(self.embed, "base_layer", self.embed).weight  # under a LoRA adapter: the frozen table
        if first > 3 and len(self.vocab) > first:
            table[first:len(self.vocab)] = table[3:first].mean(0)

    def get_extra_state(self):
        return {"vocab": self.vocab}

    def set_extra_state(self, state) -> None:
        self.vocab = list(state["vocab"])

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        index = {w: i for i, w in enumerate(self.vocab)}
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            tokens = [index.get(w, 1) for w in words(caption)][: self.max_length] or [2]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != 0

    def encode(self, captions: list[str]) -> TextEmbedding:
        ids, mask = self.tokenize(captions)
        device = self.position.device
        ids, mask = ids.to(device), mask.to(device)
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        return TextEmbedding(h, mask, mean_pool(h, mask))
