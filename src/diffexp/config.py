"""Config helpers shared by the entry points."""
from __future__ import annotations

import hydra
from hydra.errors import InstantiationException


def instantiate(cfg, **kwargs):
    """``hydra.utils.instantiate``, re-raising the user-facing error (ValueError, ...) Hydra wraps."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as wrapped:
        cause = wrapped.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError, KeyError)):
            raise cause from None
        raise


def build_model(cfg):
    """The LightningModule of a train config. Its frozen parts come first: the text encoder (``unet.context_dim``
    follows its width) and, for latent diffusion, the autoencoder (a null ``unet.in_channels`` /
    ``unet.image_size`` follows its latent channels / latent size). Values filled in are written back to ``cfg``."""
    from omegaconf import open_dict

    from hydra.utils import get_class

    from diffexp.lit.latent import LatentDiffusion

    latent = issubclass(get_class(cfg.model._target_), LatentDiffusion)
    extra = {}
    if cfg.get("text_encoder"):
        extra["text_encoder"] = encoder = instantiate(cfg.text_encoder)
        with open_dict(cfg):
            cfg.unet.context_dim = encoder.dim  # model.net interpolates ${unet}
    if cfg.get("vae") and "_target_" in cfg.vae:
        if not latent:
            raise ValueError(f"vae={cfg.vae._target_} is set but model={cfg.model._target_} does not diffuse latents; "
                             f"use model=latent (or vae=none)")
        extra["autoencoder"] = autoencoder = instantiate(cfg.vae)
        with open_dict(cfg):
            if cfg.unet.get("in_channels") is None:
                cfg.unet.in_channels = autoencoder.latent_channels
            if cfg.unet.get("image_size") is None:
                cfg.unet.image_size = autoencoder.check_image_size(cfg.data.image_size)
    elif latent:
        raise ValueError("model=latent needs an autoencoder: vae=own vae.ckpt=PATH | vae=sd_vae_ft_mse | vae=taesd")
    try:
        return instantiate(cfg.model, **extra)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise TypeError(f"model={cfg.model._target_}: {e}. The composed model config holds an option this model does "
                        f"not take, often set by the experiment preset (the default, quickstart, configures pixel "
                        f"diffusion); model=vae goes with experiment=shapes_vae") from None
