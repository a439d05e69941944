"""Interpolation rows: what a model makes of the inputs between two samples (noise and, for text models, prompt)."""
from __future__ import annotations

import torch

from diffexp.editing import interpolate
from diffexp.samplers import fixed_noise


def interpolation_frames(model, frames: int = 8, seed: int = 0, seed_b: int | None = None,
                         prompts: tuple[str, str] | None = None, sampler=None, guidance_scale: float | None = None):
    """(frames, C, H, W) images from :func:`diffexp.editing.interpolate`: endpoint noises are the
    first :func:`~diffexp.samplers.fixed_noise` image of ``seed`` and of ``seed_b`` (default ``seed + 1``; the
    same noise when only the prompt should move, ``seed_b = seed``), ``prompts`` = (a, b) for text models (one
    prompt twice: noise interpolation under that prompt; default: the model's first example caption)."""
    seed_b = seed + 1 if seed_b is None else seed_b
    x_T = torch.cat([fixed_noise(1, model.sample_shape, seed), fixed_noise(1, model.sample_shape, seed_b)])
    options = {}
    if "captions" in model.conditioner.keys:
        if prompts is None:
            caption = model.conditioner.for_sampling(torch.arange(1))["captions"][0]
            prompts = (caption, caption)
        options["captions"] = prompts
    elif prompts is not None:
        raise ValueError("--prompt needs a text-conditioned checkpoint (this one is not)")
    else:
        options.update({k: [v[0]] * frames for k, v in model.conditioner.for_sampling(torch.arange(1)).items()})
    return interpolate(model, frames, x_T.to(model.device), sampler=sampler, progress=False,
                       guidance_scale=guidance_scale, **options)


def interpolation_figure(images: torch.Tensor, title: str = ""):
    """One row: the frames, labelled with their interpolation weight w."""
    import matplotlib.pyplot as plt

    from diffexp.viz.images import show_image

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.3 * n, 1.7), squeeze=False)
    for i, image in enumerate(images):
        show_image(axes[0, i], image)
        axes[0, i].set_title(f"w = {i / (n - 1):.2f}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
