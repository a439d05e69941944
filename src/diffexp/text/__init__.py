"""Text encoders behind one interface (captions -> tokens, mask, pooled)."""
from diffexp.text.base import TextEmbedding, TextEncoder, mean_pool
from diffexp.text.learned import LearnedTextEncoder
from diffexp.text.pretrained import PretrainedTextEncoder, minilm_path

__all__ = ["TextEmbedding", "TextEncoder", "mean_pool", "LearnedTextEncoder", "PretrainedTextEncoder", "minilm_path"]
