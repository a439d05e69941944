"""The precision a denoiser runs at when sampling: a net called under autocast, returning float32 (pure torch)."""
from __future__ import annotations

from typing import Callable

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value, option: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"{option} must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def at_precision(net: Callable, precision: str, device_type: str) -> Callable:
    """``net`` called under ``torch.autocast`` at ``precision`` (``bf16`` | ``fp16``), its output cast to float32; the
    plain net for ``fp32``. CPU autocast supports bf16 only, so fp16 runs in fp32 there."""
    dtype = DTYPES.get(precision)
    if dtype is None or (device_type == "cpu" and dtype == torch.float16):
        return net

    def low_precision_net(x, t, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return net(x, t, **kwargs).float()

    return low_precision_net
