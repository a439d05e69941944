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
