"""Fine-tuning glue: start a run from another run's weights (``init_from=``), save and load LoRA adapters."""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import torch

from diffexp.callbacks.ema import ema_state_from_checkpoint
from diffexp.checkpoints import CONFIG_KEY, CheckpointError, read_checkpoint, save_weights
from diffexp.lora import LoraSettings, base_key, is_adapter_key

ADAPTER_NAME = "adapter.safetensors"
BASE_KEY = "lora_base_fingerprint"


def weights_of(path: str | Path, use_ema: bool = True, option: str = "init_from") -> tuple[dict, dict]:
    """(state dict, run config) of a checkpoint (.ckpt or model.safetensors), the EMA weights over the raw ones
    when the checkpoint has them and ``use_ema``."""
    checkpoint = read_checkpoint(path, option)
    state = dict(checkpoint["state_dict"])
    ema = ema_state_from_checkpoint(checkpoint) if use_ema else None
    state.update(ema or {})
    return state, checkpoint[CONFIG_KEY]


def _listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_initial_weights(model: torch.nn.Module, path: str | Path, use_ema: bool = True) -> dict:
    """Load the weights of ``path`` (EMA by default) into ``model`` before training (``init_from=``); the
    optimizer, schedule and step count start fresh. Layers that carry LoRA adapters take their base weight from
    the plain layer of the same name; the adapters keep their initialisation (B = 0: the base model's function).

    A model of another architecture is refused with the differing keys named. Returns {"loaded": n, "path": str}.
    """
    source, _ = weights_of(path, use_ema)
    target = model.state_dict()
    wanted = {k: base_key(k) for k in target if not is_adapter_key(k)}
    adapters_in_source = [k for k in source if is_adapter_key(k)]
    if adapters_in_source:
        raise CheckpointError(f"init_from={str(path)!r} holds LoRA adapters ({_listed(adapters_in_source, 2)}); "
                              f"start from the plain checkpoint it was trained from, or continue that LoRA run with "
                              f"ckpt_path= (its last.ckpt)")
    missing = [k for k, src in wanted.items() if src not in source and not k.startswith("space.autoencoder.")]
    unexpected = sorted(set(source) - set(wanted.values()))
    mismatched = [f"{k} {tuple(source[src].shape)} vs {tuple(target[k].shape)} here" for k, src in wanted.items()
                  if src in source and torch.is_tensor(target[k]) and torch.is_tensor(source[src])
                  and source[src].shape != target[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {_listed(keys)}" for label, keys in
                 (("shapes differ", mismatched), ("missing there", missing), ("not in this model", unexpected)) if keys]
        raise CheckpointError(f"init_from={str(path)!r} holds a model of another architecture than this config "
                              f"builds ({'; '.join(parts)}). Fine-tune with the model overrides it was trained "
                              f"with (net=, text_encoder=, model=, vae=: its run's .hydra/overrides.yaml)")
    state = dict(target)
    state.update({k: source[src] for k, src in wanted.items() if src in source})
    model.load_state_dict(state)
    return {"loaded": len(wanted), "path": str(path)}


def base_fingerprint(state: dict) -> str:
    """SHA-256 over the denoiser's frozen weights (``net.*``, adapters left out, names as before adaptation): which
    base model an adapter belongs to."""
    digest = hashlib.sha256()
    keys = [k for k in state if k.startswith("net.") and not is_adapter_key(k) and torch.is_tensor(state[k])]
    for key in sorted(keys, key=base_key):
        digest.update(base_key(key).encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model, state: dict, run_config: dict, path: str | Path) -> Path:
    """The LoRA adapter of ``state`` (a state dict of ``model``, e.g. with EMA weights) alone, in the project's
    safetensors weights format (:func:`diffexp.checkpoints.save_weights`) with the run config (which holds
    ``model.lora`` and ``init_from``) and the base's :func:`base_fingerprint` — a small file that
    ``sample.py ckpt=BASE lora=PATH`` puts on top of its base model."""
    return save_weights(model.adapter_state_dict(state), {**run_config, BASE_KEY: base_fingerprint(state)}, path)


def load_adapter(model, path: str | Path, merge: bool = False) -> LoraSettings:
    """Add the adapter saved at ``path`` (:func:`save_adapter`) to ``model`` (a base model without adapters) and
    load its weights; with ``merge`` fold it into the base weights (:func:`diffexp.lora.merge_lora`)."""
    from diffexp.checkpoints import read_weights
    from diffexp.lora import merge_lora

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lora={str(path)!r} does not exist; pass the adapter.safetensors of a run trained "
                                f"with model.lora.rank > 0 (RUN/checkpoints/{ADAPTER_NAME})")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"lora={str(path)!r} is not a .safetensors adapter file (RUN/checkpoints/{ADAPTER_NAME})")
    saved = read_weights(path, "lora")
    lora_config = (saved[CONFIG_KEY].get("model") or {}).get("lora") or {}
    settings = LoraSettings.from_config(lora_config)
    if settings.rank == 0:
        raise CheckpointError(f"lora={str(path)!r} comes from a run without LoRA (model.lora.rank=0)")
    if getattr(model, "lora", None) is not None:
        raise CheckpointError(f"the checkpoint already carries LoRA adapters (rank {model.lora.rank}); pass its base "
                              f"model as ckpt=, or sample the fine-tuned checkpoint without lora=")
    trained_on = saved[CONFIG_KEY].get("init_from") or "its run's init_from"
    probe = copy.deepcopy(model)  # the checks run on a copy: a refused adapter leaves the model as it was
    probe.add_lora(settings)
    expected = set(probe.adapter_state_dict())
    missing, unexpected = sorted(expected - set(saved["state_dict"])), sorted(set(saved["state_dict"]) - expected)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    shapes = {k: v for k, v in probe.state_dict().items() if torch.is_tensor(v)}
    mismatched = [f"{k} {tuple(v.shape)} there, {tuple(shapes[k].shape)} here" for k, v in saved["state_dict"].items()
                  if torch.is_tensor(v) and k in shapes and v.shape != shapes[k].shape]
    del probe
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{label}: {_listed(keys, 3)}" for label, keys in (("shapes differ", mismatched),
                           ("not in the adapter", missing), ("not in this model", unexpected)) if keys)
        raise CheckpointError(f"lora={str(path)!r} was trained on a different model (base: {trained_on}); pass that "
                              f"checkpoint as ckpt= ({detail})")
    fingerprint = saved[CONFIG_KEY].get(BASE_KEY)
    if fingerprint and fingerprint != base_fingerprint(model.state_dict()):
        warnings.warn(f"lora={str(path)!r} was trained on other weights of this architecture (base: {trained_on}); "
                      f"its images will not be the fine-tuned model's", stacklevel=2)
    model.add_lora(settings)
    encoder = getattr(model.conditioner, "encoder", None)
    known_words = len(getattr(encoder, "vocab", []))
    state = model.state_dict()
    state.update(saved["state_dict"])
    model.load_state_dict(state)
    if hasattr(encoder, "initialise_rows") and len(encoder.vocab) > known_words:
        encoder.initialise_rows(known_words)  # words the fine-tuning added: as they started there
    model.adapter_info = {"path": str(path), "settings": settings.as_dict(),
                          "base": (saved[CONFIG_KEY].get("init_from") or None)}
    if merge:
        merge_lora(model)
    return settings


def adapter_summary(model) -> str:
    """One line: rank, adapted layers, trainable parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = {where: len(names) for where, names in getattr(model, "lora_layers", {}).items()}
    return json.dumps({"rank": model.lora.rank, "alpha": model.lora.alpha or model.lora.rank,
                       "adapted_layers": layers, "trainable_parameters": trainable})
