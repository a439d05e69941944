"""Whether two diffusion models can work on each other's x_t: a distillation's teacher and student, a model and its
autoguidance guide."""
from __future__ import annotations

import math


def describe(model) -> dict:
    """What two models working on the same x_t must share: path, prediction, conditioning, space, sample shape;
    and the net architecture (LoRA adapters left out: they start as the identity)."""
    from diffexp.lora import base_key, is_adapter_key

    net_shapes = {base_key(k): tuple(v.shape) for k, v in model.net.state_dict().items() if not is_adapter_key(k)}
    return {"path": repr(model.path), "prediction": repr(model.prediction),
            "conditioning": type(model.conditioner).__name__, "space": type(model.space).__name__,
            "sample shape": tuple(model.sample_shape),
            "net": f"{type(model.net).__name__} ({len(net_shapes)} tensors, "
                   f"{sum(math.prod(s) for s in net_shapes.values()):,} parameters)",
            "_net_shapes": net_shapes}


def differences(model, other, net: bool = True) -> list[str]:
    """What differs between ``model`` (here) and ``other`` (there), one line each; ``net=False`` allows another
    denoiser (autoguidance's smaller guide)."""
    mine, theirs = describe(model), describe(other)
    keys = [k for k in mine if not k.startswith("_") and (net or k != "net")]
    differ = [f"{k}: {theirs[k]} there, {mine[k]} here" for k in keys if mine[k] != theirs[k]]
    if net and not differ and mine["_net_shapes"] != theirs["_net_shapes"]:
        differ = ["net: the same kind of denoiser with other layer sizes"]
    return differ
