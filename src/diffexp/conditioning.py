"""Conditioners: what a diffusion model is conditioned on, as one small class per kind (``conditioning`` group).

A conditioner turns a training batch into the net's keyword arguments (dropping the condition at rate
``p_uncond`` for classifier-free guidance), gives the null condition, the fixed monitoring conditions,
the guided model function for sampling, and fits itself to the data. The diffusion module only calls
these methods; it never asks which kind it holds.

- :class:`Unconditional` (``conditioning=none``)
- :class:`ClassConditioner` (``conditioning=class``, or ``text_encoder=class``): a label embedding; label
  ``num_classes`` is the null label.
- :class:`TextConditioner` (chosen by every ``text_encoder=`` encoder): captions through a text encoder into
  cross-attention; the empty caption is the null condition.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from diffexp.guiders import GuidedModel, Guider
from diffexp.registry import register_part


IMAGE_FOLDER_LABELS = " (data=image_folder: data.labels=folders makes each top-level folder a class)"


def check_p_uncond(p_uncond: float) -> float:
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"conditioning.p_uncond must lie in [0, 1], got {p_uncond}")
    return p_uncond


class Conditioner(nn.Module):
    """Base class and the contract.

    ``keys`` names the conditions :meth:`diffexp.lit.DiffusionModel.sample` accepts (e.g. ``captions``);
    ``conditional`` says whether there is anything to guide.
    """

    keys: tuple[str, ...] = ()
    conditional = True
    requires_conditions = False  # True: sampling without conditions is an error (not an unconditional sample)

    def __init__(self, p_uncond: float = 0.1):
        super().__init__()
        self.p_uncond = check_p_uncond(p_uncond)

    def net_arguments(self) -> dict:
        """Arguments the denoiser must be built with (e.g. ``context_dim``), filled into the ``net`` config."""
        return {}

    def check_net(self, net: nn.Module) -> None:
        """Raise a clear error if ``net`` cannot take this conditioning."""

    def fit(self, datamodule) -> None:
        """Adapt to the data before training (read through the datamodule's declared interface)."""

    def from_batch(self, batch: dict, drop: bool = False, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> dict:
        """The net's keyword arguments for a training batch; with ``drop`` each item's condition is replaced
        by the null one with probability ``p_uncond`` (drawn from ``generator``)."""
        return {}

    def encode(self, conditions: dict, n: int, device: torch.device | str) -> dict:
        """The net's keyword arguments for ``n`` user conditions (e.g. ``{"captions": [...]}``)."""
        return {}

    def null(self, n: int, device: torch.device | str) -> dict:
        """The net's keyword arguments for the unconditional prediction of ``n`` items."""
        return {}

    def for_sampling(self, indices: torch.Tensor) -> dict:
        """Fixed monitoring conditions for the samples numbered ``indices`` (grids, FID): the same sample
        index always gets the same condition, so runs and ranks agree."""
        return {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """{name: module} of the conditioner's own trainable networks (a learned text encoder), for adapters."""
        return {}

    def interpolated(self, captions: tuple[str, str], weights: torch.Tensor, device) -> dict:
        """The net's condition arguments between two captions, one set per weight in [0, 1] (text models)."""
        raise ValueError("interpolating prompts needs a text-conditioned model (this one is not)")

    def check_conditions(self, conditions: dict) -> dict:
        """The given (non-None) conditions; a clear error for ones this model does not take."""
        given = {k: v for k, v in conditions.items() if v is not None}
        unknown = sorted(set(given) - set(self.keys))
        if unknown:
            accepted = f"it takes {list(self.keys)}" if self.keys else "it is unconditional"
            raise ValueError(f"this model cannot be conditioned on {unknown}: {accepted}")
        return given

    def model_fn(self, net: Callable, n: int, conditions: dict, guider: Guider, path, prediction_type: str,
                 device: torch.device | str = "cpu", guide: tuple | None = None) -> GuidedModel:
        """(x_t, t) -> prediction for sampling ``n`` items under ``conditions``, guided by ``guider``
        (:mod:`diffexp.guiders`; ``guide`` = (net function, its condition arguments) of autoguidance's second
        model); without conditions, the unconditional prediction (autoguided if the guider has a guide)."""
        given = self.check_conditions(conditions)
        guide_fn, guide_cond = guide or (None, None)
        if not given and not self.requires_conditions:
            null = self.null(n, device)
            if guider.needs_guide:
                return guider.bind(net, null, null, path, prediction_type, guide_fn, guide_cond)
            return unguided(net, null)
        return guider.bind(net, self.encode(given, n, device), self.null(n, device), path, prediction_type,
                           guide_fn, guide_cond)


def unguided(net: Callable, arguments: dict) -> GuidedModel:
    """The net with ``arguments`` bound: one pass per evaluation, no guidance."""
    return GuidedModel(lambda x, t: (net(x, t, **arguments), 1))


@register_part
class Unconditional(Conditioner):
    """No conditioning: the net gets x_t and t only (``p_uncond`` is accepted and has nothing to drop)."""

    conditional = False

    def model_fn(self, net, n, conditions, guider, path, prediction_type, device="cpu", guide=None):
        self.check_conditions(conditions)
        if guider.needs_guide:
            return guider.bind(net, {}, {}, path, prediction_type, *(guide or (None, None)))
        return unguided(net, {})


@register_part
class ClassConditioner(Conditioner):
    """Class labels (``batch["label"]``) through the net's label embedding; label ``num_classes`` = no label.

    Args:
        num_classes: the number of classes in the data (null in the config: taken from the datamodule).
        p_uncond: probability of replacing a label by the null label in training.
    """

    keys = ("class_labels",)

    def __init__(self, num_classes: int, p_uncond: float = 0.1):
        super().__init__(p_uncond)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"conditioning=class needs labelled data (num_classes >= 1), got num_classes={num_classes}"
                             f"{IMAGE_FOLDER_LABELS if num_classes is None else ''}; or train unconditionally with "
                             f"conditioning=none")
        self.num_classes = num_classes

    def net_arguments(self) -> dict:
        return {"num_classes": self.num_classes}

    def check_net(self, net) -> None:
        if getattr(net, "num_classes", None) != self.num_classes:
            raise ValueError(f"conditioning=class with {self.num_classes} classes needs a denoiser built with "
                             f"net.num_classes={self.num_classes}, got {getattr(net, 'num_classes', None)}")

    def labels(self, labels: torch.Tensor, n: int, device) -> torch.Tensor:
        labels = torch.as_tensor(labels).long().to(device)
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must be {n} integers in [0, {self.num_classes}), got {labels.tolist()}")
        return labels

    def fit(self, datamodule) -> None:
        """Check the data has labels this model can take (at most ``num_classes`` classes)."""
        data_classes = datamodule.num_classes
        if data_classes is None:
            raise ValueError(f"conditioning=class needs labelled data, but data={datamodule.name} has no class "
                             f"labels{IMAGE_FOLDER_LABELS if datamodule.name == 'image_folder' else ''}; or train "
                             f"unconditionally with conditioning=none")
        if data_classes > self.num_classes:
            raise ValueError(f"data={datamodule.name} has labels up to {data_classes - 1}, but the model has "
                             f"conditioning.num_classes={self.num_classes}; set conditioning.num_classes >= "
                             f"{data_classes} (or null: the data's count)")

    def from_batch(self, batch, drop=False, generator=None, device="cpu"):
        labels = batch["label"].clone()
        if drop and self.p_uncond > 0:
            mask = torch.rand(labels.shape, device=labels.device, generator=generator) < self.p_uncond
            labels[mask] = self.num_classes
        return {"class_labels": labels}

    def encode(self, conditions, n, device):
        return {"class_labels": self.labels(conditions["class_labels"], n, device)}

    def null(self, n, device):
        return {"class_labels": torch.full((n,), self.num_classes, dtype=torch.long, device=device)}

    def for_sampling(self, indices):
        return {"class_labels": indices % self.num_classes}


@register_part
class TextConditioner(Conditioner):
    """Captions (``batch["caption"]``) through ``encoder`` (a :class:`diffexp.text.TextEncoder`) into the
    net's cross-attention; the empty caption is the null condition.

    :meth:`fit` builds a learned encoder's vocabulary from the training captions (or, when the encoder already has
    one, from trained weights, appends the new words: ids never change) and remembers up to 64
    validation captions as monitoring prompts (saved with the weights, so a checkpoint keeps them).
    """

    keys = ("captions",)
    requires_conditions = True

    def __init__(self, encoder: nn.Module, p_uncond: float = 0.1):
        super().__init__(p_uncond)
        if encoder is None:
            raise ValueError("conditioning=text needs a text encoder: text_encoder=learned|minilm|clip|t5")
        self.encoder = encoder
        self.example_captions: list[str] = []

    def net_arguments(self) -> dict:
        return {"context_dim": self.encoder.dim}

    def check_net(self, net) -> None:
        if getattr(net, "context_dim", None) != self.encoder.dim:
            raise ValueError(f"net.context_dim={getattr(net, 'context_dim', None)} must equal the text encoder's "
                             f"width {self.encoder.dim}")

    def get_extra_state(self) -> dict:
        return {"example_captions": list(self.example_captions)}

    def set_extra_state(self, state: dict) -> None:
        self.example_captions = list(state.get("example_captions", []))

    def fit(self, datamodule) -> None:
        if not self.example_captions:
            self.example_captions = list(self._captions(datamodule, "val")[:64])
        if self.encoder.needs_vocabulary:
            self.encoder.fit_vocabulary(self._captions(datamodule, "train"))
        elif hasattr(self.encoder, "extend_vocabulary"):  # started from trained weights: new words are appended
            added = self.encoder.extend_vocabulary(self._captions(datamodule, "train"))
            if added:
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(f"[diffexp] text encoder vocabulary extended by {len(added)} words {added[:10]} "
                               f"(existing ids unchanged)")

    @staticmethod
    def _captions(datamodule, split: str) -> list[str]:
        captions = datamodule.captions(split)
        if not captions:
            raise ValueError(f"a text encoder needs captions, but data={datamodule.name} has none in its {split} "
                             f"split (image_folder: a metadata.jsonl with file_name and text)")
        return captions

    def embed(self, captions: list[str], device) -> dict:
        return self.encoder(list(captions)).to(device).as_kwargs()

    def from_batch(self, batch, drop=False, generator=None, device="cpu"):
        captions = list(batch["caption"])
        if drop and self.p_uncond > 0:
            keep = (torch.rand(len(captions), generator=generator, device=device) >= self.p_uncond).cpu()
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        return self.embed(captions, device)

    def encode(self, conditions, n, device):
        captions = conditions.get("captions")
        if captions is None or isinstance(captions, str) or len(captions) != n:
            raise ValueError(f"this model is text-conditioned: pass {n} captions (prompt=...)")
        return self.embed(captions, device)

    def null(self, n, device):
        return self.embed([""] * n, device)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"text encoder": self.encoder} if getattr(self.encoder, "trainable", False) else {}

    def interpolated(self, captions: tuple[str, str], weights: torch.Tensor, device) -> dict:
        """The net's text arguments between two captions' embeddings, one set per weight w in [0, 1]:
        (1 - w) e_a + w e_b for the tokens and the pooled vector. The token mask is the first caption's at w = 0,
        the second's at w = 1 and their union in between (positions that are padding in one caption carry its
        padding embedding), so the endpoints are exactly the two captions."""
        pair = self.encoder(list(captions))
        w = weights.to(pair.tokens)
        tokens = (1 - w)[:, None, None] * pair.tokens[0] + w[:, None, None] * pair.tokens[1]
        pooled = (1 - w)[:, None] * pair.pooled[0] + w[:, None] * pair.pooled[1]
        mask = (pair.mask[0] | pair.mask[1]).expand(len(w), -1).clone()
        mask[weights == 0], mask[weights == 1] = pair.mask[0], pair.mask[1]
        return {"context": tokens.to(device), "context_mask": mask.to(device), "pooled": pooled.to(device)}

    def for_sampling(self, indices):
        captions = self.example_captions or [""]
        return {"captions": [captions[i % len(captions)] for i in indices.tolist()]}
