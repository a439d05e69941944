"""Classifier-free guidance made visible: the same prompt and noise at several guidance scales."""
from __future__ import annotations

import torch

from diffexp.samplers import fixed_noise


def guidance_samples(model, prompt: str, scales=(0.0, 1.0, 2.0, 4.0, 7.5), n: int = 4, seed: int = 0,
                     sampler=None) -> dict[float, torch.Tensor]:
    """{scale: n images} for a text-conditioned model, every scale starting from the same noise."""
    if "captions" not in model.conditioner.keys:
        raise ValueError("guidance needs a text-conditioned checkpoint (trained with text_encoder=learned|minilm|...)")
    x_T = fixed_noise(n, model.sample_shape, seed).to(model.device)
    return {s: model.sample(n, sampler=sampler, x_T=x_T, captions=[prompt] * n, guidance_scale=s, progress=False)
            for s in scales}


def guidance_figure(samples: dict[float, torch.Tensor], prompt: str = ""):
    """Columns = guidance scales, rows = samples (same noise across a row)."""
    import matplotlib.pyplot as plt

    from diffexp.viz.images import show_image

    scales = list(samples)
    n = len(next(iter(samples.values())))
    fig, axes = plt.subplots(n, len(scales), figsize=(1.5 * len(scales), 1.5 * n + 0.4), squeeze=False)
    for c, s in enumerate(scales):
        for r in range(n):
            show_image(axes[r, c], samples[s][r])
        axes[0, c].set_title(f"w = {s:g}", fontsize=9)
    fig.suptitle(f'"{prompt}"' if prompt else "", fontsize=10)
    fig.tight_layout()
    return fig
