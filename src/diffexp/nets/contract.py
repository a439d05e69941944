"""The denoiser contract every backbone (:class:`~diffexp.nets.UNet`, :class:`~diffexp.nets.DiT`) satisfies; the
training and sampling code reads nothing else of a net."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """``net(x, t, class_labels=None, context=None, context_mask=None, pooled=None) -> Tensor like x``.

    ``x`` (N, in_channels, image_size, image_size) is the noisy input, ``t`` (N,) the float noise-conditioning
    input the path defines (:meth:`diffexp.paths.GaussianPath.net_input`), ``class_labels`` (N,) long with
    ``num_classes`` the null class, ``context`` (N, L, context_dim) text tokens with ``context_mask`` (N, L) (True =
    a real token) and ``pooled`` (N, context_dim) the pooled text vector. The output is the raw prediction whose
    meaning the model's ``prediction_type`` gives.
    """

    in_channels: int
    image_size: int
    context_dim: int | None
    num_classes: int | None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                 context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                 pooled: torch.Tensor | None = None) -> torch.Tensor: ...
