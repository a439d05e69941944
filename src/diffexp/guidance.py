"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper; optional guidance rescale (Lin et al. 2023)."""
from __future__ import annotations

from typing import Callable

import torch


def guided_model(model_fn: Callable, cond: dict, uncond: dict, guidance_scale: float,
                 guidance_rescale: float = 0.0) -> Callable:
    """model_fn(x, t, **kw) -> a function (x, t) -> guided prediction.

    pred = uncond + s * (cond - uncond), with the conditional and unconditional passes batched
    into one forward call. ``guidance_rescale`` = phi rescales the result towards the std of the
    conditional prediction: pred <- phi * pred * std(cond)/std(pred) + (1 - phi) * pred.
    With s = 1 only the conditional pass runs.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if set(cond) != set(uncond):
        raise ValueError(f"conditional and unconditional inputs differ in keys: {sorted(cond)} vs {sorted(uncond)}")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return model_fn(x, t, **cond)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        out_cond, out_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        pred = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0:
            dims = list(range(1, pred.ndim))
            ratio = out_cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True).clamp(min=1e-8)
            pred = guidance_rescale * pred * ratio + (1 - guidance_rescale) * pred
        return pred

    return fn
