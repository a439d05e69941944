"""Reading the checkpoints train.py writes, and bringing older ones up to the current layout.

Each checkpoint carries its composed run config under :data:`CONFIG_KEY` and the layout version under
:data:`FORMAT_KEY`. Format 1 (before the conditioner/space restructuring) is upgraded on load by
:func:`upgrade_checkpoint`, so old checkpoints keep working with ``sample.py`` and ``ckpt_path=``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

CONFIG_KEY = "diffexp_config"
FORMAT_KEY = "diffexp_format"
FORMAT = 2
DIFFUSION_TARGET = "diffexp.lit.DiffusionModel"
LEGACY_DIFFUSION_TARGETS = ("diffexp.lit.pixel.PixelDiffusion", "diffexp.lit.latent.LatentDiffusion")
# state-dict prefixes renamed in format 2
RENAMED_PREFIXES = {"text_encoder.": "conditioner.encoder.", "latent_scale": "space.latent_scale",
                    "latent_shift": "space.latent_shift"}


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict:
    """The checkpoint dict at ``path`` in the current layout; a clear error (naming ``option``) if it is
    missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}={str(path)!r} does not exist; pass a checkpoint written by train.py, "
                                f"e.g. {option}=logs/train/latest/checkpoints/last.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint:
        raise ValueError(f"{option}={str(path)!r} carries no diffexp config (key {CONFIG_KEY!r}); "
                         f"was it written by train.py?")
    upgrade_checkpoint(checkpoint)
    return checkpoint


def upgrade_run_config(cfg: dict) -> dict:
    """A format-1 run config (dict) in the format-2 layout: the model's conditioning becomes the
    ``conditioning`` node, latent settings the model's ``space``, ``warmup_steps`` the ``lr_scheduler``."""
    cfg = copy.deepcopy(cfg)
    model = cfg.get("model", {})
    target = str(model.get("_target_", ""))
    warmup = model.pop("warmup_steps", 0)
    model.setdefault("lr_scheduler", {"_target_": "diffexp.lit.base.linear_warmup", "_partial_": True,
                                      "warmup_steps": warmup})
    if target.endswith("VAETraining"):
        model.pop("num_logged_images", None)
        return cfg
    if target not in LEGACY_DIFFUSION_TARGETS:
        return cfg
    model["_target_"] = DIFFUSION_TARGET
    model.pop("net", None)
    p_uncond = model.pop("p_uncond", 0.1)
    class_conditional = model.pop("class_conditional", False)
    if (cfg.get("text_encoder") or {}).get("_target_"):
        cfg["conditioning"] = {"_target_": "diffexp.conditioning.TextConditioner", "encoder": None,
                               "p_uncond": p_uncond}
    elif class_conditional:
        cfg["conditioning"] = {"_target_": "diffexp.conditioning.ClassConditioner", "p_uncond": p_uncond,
                               "num_classes": cfg["unet"]["num_classes"]}
    else:
        cfg["conditioning"] = {"_target_": "diffexp.conditioning.Unconditional"}
    if target.endswith("LatentDiffusion"):
        model["space"] = {"_target_": "diffexp.spaces.LatentSpace", "autoencoder": None,
                          "image_size": model.pop("image_size"),
                          "scale_factor": model.pop("scale_factor", None),
                          "scale_estimate_images": model.pop("scale_estimate_images", 1024)}
        cfg["cache_latents"] = model.pop("cache_latents", False)
    else:
        model["space"] = {"_target_": "diffexp.spaces.PixelSpace"}
    return cfg


def _renamed(key: str) -> str:
    for old, new in RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """Bring a checkpoint dict to the current format in place (config, state dict, EMA state); returns it.

    Format 1 kept the text encoder under ``text_encoder.``, the latent scale as ``latent_scale`` and the
    example captions beside the state dict; it did not carry the weights of an own VAE (the model fills
    them from the VAE file it was built with, see ``DiffusionModel.on_load_checkpoint``)."""
    if checkpoint.get(FORMAT_KEY, 1) >= FORMAT:
        return checkpoint
    checkpoint[CONFIG_KEY] = upgrade_run_config(checkpoint[CONFIG_KEY])
    if checkpoint[CONFIG_KEY].get("model", {}).get("_target_") == DIFFUSION_TARGET:
        checkpoint["state_dict"] = {_renamed(k): v for k, v in checkpoint["state_dict"].items()}
        captions = checkpoint.pop("diffexp_example_captions", None)
        if checkpoint[CONFIG_KEY]["conditioning"]["_target_"].endswith("TextConditioner"):
            checkpoint["state_dict"]["conditioner._extra_state"] = {"example_captions": list(captions or [])}
        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, dict) and isinstance(state.get("ema_state"), dict):
                state["ema_state"] = {_renamed(k): v for k, v in state["ema_state"].items()}
    checkpoint[FORMAT_KEY] = FORMAT
    return checkpoint
