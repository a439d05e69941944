"""Low-rank adapters (LoRA, Hu et al. 2022) on a diffusion model's layers, through the ``peft`` library.

A targeted linear or convolution layer W becomes W + (alpha / rank) B A with A (rank x in) random and B
(out x rank) zero, so training starts from the base model's function and only A and B learn. On an embedding table
(a learned text encoder's words) word i gets its own update B A[:, i] (A: rank x vocabulary, zero at the start; B:
dim x rank, random, as peft initialises embeddings), so a word added to the vocabulary can learn its own vector; the
base rows stay frozen, though the adapted vectors of existing words move wherever their columns of A get gradients.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

#: Attention projections of both backbones (self-attention ``qkv``/``proj``, cross-attention ``to_q``/``to_kv``/
#: ``proj``, the U-Net transformer blocks' ``proj_out``), the DiT blocks' MLP (``fc1``/``fc2``) and a learned text
#: encoder's word table (``embed``).
DEFAULT_TARGETS = ("qkv", "to_q", "to_kv", "proj", "proj_out", "fc1", "fc2", "embed")
LORA_MARK = "lora_"


@dataclass
class LoraSettings:
    """``model.lora``: ``rank`` 0 = off; ``alpha`` (default: rank, a scale of 1); ``target_modules``: layer
    names (the last part of a module's name) that get adapters; ``dropout`` on the adapter's input."""

    rank: int = 0
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"model.lora.rank must be an integer >= 0 (0: no LoRA), got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or self.alpha <= 0):
            raise ValueError(f"model.lora.alpha must be a positive number or null (= rank), got {self.alpha!r}")
        if isinstance(self.target_modules, str) or not self.target_modules \
                or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"model.lora.target_modules must be a non-empty list of layer names, e.g. "
                             f"{list(DEFAULT_TARGETS)}; got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must lie in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_config(cls, config) -> "LoraSettings":
        if config is None:
            return cls()
        if isinstance(config, LoraSettings):
            return config
        config = dict(config)
        unknown = sorted(set(config) - {"rank", "alpha", "target_modules", "dropout"})
        if unknown:
            raise ValueError(f"model.lora takes rank, alpha, target_modules, dropout; not {unknown}")
        return cls(**config)

    def as_dict(self) -> dict:
        return asdict(self)


ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Embedding)


def matching_layers(module: nn.Module, targets: list[str]) -> list[str]:
    """Names of the Linear/Conv2d/Embedding layers of ``module`` whose last name part is one of ``targets``."""
    return [name for name, layer in module.named_modules()
            if isinstance(layer, ADAPTABLE) and name.rsplit(".", 1)[-1] in targets and LORA_MARK not in name]


def add_lora(modules: dict[str, nn.Module], settings: LoraSettings) -> dict[str, list[str]]:
    """Inject adapters with ``settings`` into the matching layers of each module (in place, ``peft``'s
    ``inject_adapter_in_model``); returns {module name: adapted layer names}. A clear error when no layer of any
    module matches ``settings.target_modules`` (e.g. a U-Net without attention and only attention targets)."""
    from peft import LoraConfig, inject_adapter_in_model

    found = {where: matching_layers(module, settings.target_modules) for where, module in modules.items()}
    if not any(found.values()):
        names = sorted({".".join(name.split(".")[-2:]) if name.rsplit(".", 1)[-1].isdigit() else name.rsplit(".", 1)[-1]
                        for module in modules.values() for name, layer in module.named_modules()
                        if isinstance(layer, ADAPTABLE)})  # a Sequential's layers by parent.index
        raise ValueError(f"model.lora.target_modules={settings.target_modules} match no layer of this model; layers "
                         f"it has: {names} (qkv, proj: self-attention; to_q, to_kv: cross-attention, text models "
                         f"only; a net without attention has none of these; conv1, conv2: ResBlock convolutions)")
    for where, layers in found.items():
        if layers:
            config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, target_modules=layers,
                                lora_dropout=settings.dropout)
            inject_adapter_in_model(config, modules[where])
    return found


def is_adapter_key(key: str) -> bool:
    return LORA_MARK in key


def base_key(key: str) -> str:
    """The state-dict key a weight had before its layer was adapted (peft moves it to ``base_layer``)."""
    return key.replace(".base_layer.", ".")


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [layer for layer in module.modules() if isinstance(layer, LoraLayer)]


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Add every adapter's (alpha / rank) B A into its base weight (peft's ``merge``), so sampling runs the plain
    layers; returns the number of layers merged."""
    layers = [layer for layer in lora_layers(module) if not layer.merged]
    for layer in layers:
        layer.merge()
    return len(layers)
