"""The library API over checkpoints: rebuild a model from its checkpoint alone, draw samples from it.

What notebooks, the playground, export, the figures CLI and sample.py share:

    from diffexp.api import draw_samples, load_model
    model, cfg = load_model("logs/train/latest/checkpoints/last.ckpt")
    images = draw_samples(model, 64, sampler=None, seed=0, batch_size=64)     # [-1, 1], N x C x H x W
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffexp.callbacks.ema import ema_state_from_checkpoint
from diffexp.checkpoints import CONFIG_KEY, CheckpointError, non_finite_tensors, read_checkpoint
from diffexp.config import build_model, instantiate
from diffexp.editing import edit, inpaint
from diffexp.lit import DiffusionModel


def load_model(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """The LightningModule saved in ``path``, built from the config inside it, EMA weights if present and asked for.

    Returns (model in eval mode, training config as a DictConfig).
    """
    checkpoint = read_checkpoint(path, "ckpt")  # in the current layout (older checkpoints are upgraded)
    train_cfg = OmegaConf.create(checkpoint[CONFIG_KEY])
    model = build_model(train_cfg, from_checkpoint=True)
    if not isinstance(model, DiffusionModel):
        raise ValueError(f"ckpt={str(path)!r} holds a {type(model).__name__} checkpoint, not a diffusion model; sample.py "
                         f"samples from checkpoints of model=pixel|latent (a VAE is used through vae.ckpt=)")
    ema = ema_state_from_checkpoint(checkpoint) if use_ema else None
    bad = non_finite_tensors(checkpoint["state_dict"]) + non_finite_tensors(ema or {})
    if bad:
        raise CheckpointError(f"ckpt={str(path)!r} holds NaN/inf weights ({len(bad)} tensors, e.g. {bad[0]}): the run "
                              f"diverged before it was written; use an earlier checkpoint of the run")
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    if ema is not None:
        model.load_state_dict(ema, strict=False)
    model.run_config = checkpoint[CONFIG_KEY]
    return model.to(device).eval(), train_cfg


def resolve_device(device: str) -> torch.device:
    """``auto`` (a GPU if there is one), ``cpu``, ``cuda`` or ``cuda:N``; a clear error for anything else or a GPU
    that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}; allowed: auto, cpu, cuda, cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available here; use device=cpu (or auto)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but there are {torch.cuda.device_count()} GPUs")
    return resolved


def draw_samples(model, n: int, sampler, seed: int, batch_size: int, conditions: dict | None = None,
                 progress: bool = True, guidance_scale: float | None = None,
                 guidance_rescale: float | None = None, batch_seconds: list | None = None,
                 init_images: torch.Tensor | None = None, strength: float = 1.0,
                 mask: torch.Tensor | None = None, resampling: dict | None = None, observe=None,
                 guider=None) -> torch.Tensor:
    """``n`` samples in [-1, 1] drawn in batches; the noise comes from one generator seeded with ``seed``.

    ``conditions`` hold one entry per sample (``class_labels``, ``captions``: the model's conditioner says
    which); conditional models use classifier-free guidance, or ``guider`` (:func:`make_guider`). ``batch_seconds``, if given, receives each batch's
    wall time (the first includes compilation when the net is compiled). With ``init_images`` (one per sample)
    each is edited instead (:func:`diffexp.editing.edit`, SDEdit at ``strength``), or inpainted where
    ``mask`` is 1 (:func:`diffexp.editing.inpaint`, with ``resampling``: its ``jump_length`` and
    ``jump_n_sample``). ``observe(i, t, x_t, x0)`` sees each step of plain sampling as it runs (the playground).
    """
    if n <= 0:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    sampler = model.make_sampler(sampler)
    chunks = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        cond = {k: v[start:start + m] for k, v in (conditions or {}).items()}
        start_time = time.perf_counter()
        options = dict(progress=progress, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                       guider=guider, **cond)
        if init_images is not None and mask is not None:
            chunks.append(inpaint(model, init_images[start:start + m], mask, sampler, generator, strength=strength,
                                        **(resampling or {}), **options).cpu())
        elif init_images is not None:
            chunks.append(edit(model, init_images[start:start + m], strength, sampler, generator, **options).cpu())
        else:
            chunks.append(model.sample(m, sampler=sampler, generator=generator, observe=observe, **options).cpu())
        if batch_seconds is not None:
            batch_seconds.append(time.perf_counter() - start_time)
    return torch.cat(chunks)


def make_guider(guider, model, **options):
    """A :class:`diffexp.guiders.Guider` for ``model``: a Guider as is, a name (``cfg``, ``interval``, ``apg``,
    ``cfgpp``, ``auto``) with its ``options``, or a config (sample.py's ``guider`` group). Autoguidance's
    ``guide_ckpt`` is loaded (EMA weights, on the model's device) and checked against ``model``: the same path,
    prediction, conditioning, data space and sample shape (its net may differ)."""
    from omegaconf import DictConfig

    from diffexp.guiders import GUIDERS, Guider
    from diffexp.lit.compat import differences

    if isinstance(guider, DictConfig):
        guider = instantiate(guider)
    elif isinstance(guider, str):
        if guider not in GUIDERS:
            raise ValueError(f"guider={guider!r}; choose one of {sorted(GUIDERS)}")
        guider = GUIDERS[guider](**options)
    if not isinstance(guider, Guider):
        raise TypeError(f"guider must be a name, a guider config or a diffexp.guiders.Guider, got {guider!r}")
    if guider.needs_guide and getattr(guider, "guide_model", None) is None:
        if not guider.guide_ckpt:
            raise ValueError(f"guider={guider.name} needs guider.guide_ckpt=CKPT: a weaker version of this model (e.g. "
                             f"the same preset trained for a quarter of the steps)")
        guide, _ = load_model(guider.guide_ckpt, device=model.device)
        differ = differences(model, guide, net=False)
        if differ:
            raise ValueError(f"guider.guide_ckpt={guider.guide_ckpt!r} cannot guide this model: {'; '.join(differ)}. "
                             f"The guide must denoise the same x_t: train it with the model's own formulation, data "
                             f"and conditioning")
        guider.guide_model = guide
    return guider


def sampling_conditions(model, prompts: list[str] | None, n: int) -> dict:
    """One condition per sample: the model's monitoring conditions (class labels 0..C-1 cycling, example
    captions cycling), with ``prompts`` as the captions when given."""
    conditions = model.conditioner.for_sampling(torch.arange(n))
    if prompts is not None:
        if "captions" not in model.conditioner.keys:
            raise ValueError("this checkpoint is not text-conditioned; prompt/prompts_file cannot be used")
        conditions["captions"] = prompts
        encoder = getattr(model.conditioner, "encoder", None)
        unknown = encoder.unknown_words(prompts) if hasattr(encoder, "unknown_words") else []
        if unknown:
            warnings.warn(f"prompt words this model's tokenizer does not know, each read as <unk>: {unknown[:8]}",
                          stacklevel=2)
    return conditions
