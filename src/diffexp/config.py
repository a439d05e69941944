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
    """The LightningModule of a train config, with its text encoder (if any) built first so that
    ``unet.context_dim`` follows the encoder's width (written back into ``cfg``)."""
    from omegaconf import open_dict

    encoder = instantiate(cfg.text_encoder) if cfg.get("text_encoder") else None
    if encoder is not None:
        with open_dict(cfg):
            cfg.unet.context_dim = encoder.dim  # model.net interpolates ${unet}
        return instantiate(cfg.model, text_encoder=encoder)
    return instantiate(cfg.model)
