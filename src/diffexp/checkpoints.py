"""Reading the checkpoints train.py writes safely, and bringing older ones up to the current layout.

Loading never runs code: files are read with ``torch.load(weights_only=True)`` (tensors and plain data
only), and a model is rebuilt from a stored config only through registered parts (:func:`allowed_targets`).
Each checkpoint carries its composed run config under :data:`CONFIG_KEY` and the layout version under
:data:`FORMAT_KEY`. Older formats are upgraded on load by :func:`upgrade_checkpoint` (format 1: before the
conditioner/space restructuring; format 2: before the continuous-time core, when a model had a discrete
``schedule`` instead of a ``path``; format 3: before the ``net`` group, when the denoiser's node was
``unet``), so old checkpoints keep working with ``sample.py`` and ``ckpt_path=``.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable

import torch

CONFIG_KEY = "diffexp_config"
FORMAT_KEY = "diffexp_format"
FORMAT = 4
DIFFUSION_TARGET = "diffexp.lit.DiffusionModel"
LEGACY_DIFFUSION_TARGETS = ("diffexp.lit.pixel.PixelDiffusion", "diffexp.lit.latent.LatentDiffusion")
# state-dict prefixes renamed in format 2
RENAMED_PREFIXES = {"text_encoder.": "conditioner.encoder.", "latent_scale": "space.latent_scale",
                    "latent_shift": "space.latent_shift"}


# the parts of a run config that loading a model instantiates (``data`` too, when sample.py computes FID)
MODEL_NODES = ("model", "net", "conditioning", "text_encoder", "vae", "schedule", "sampler", "path", "density",
               "weighting")


def allowed_targets() -> frozenset[str]:
    """Every ``_target_`` a stored config may name when a model is rebuilt: the parts in diffexp's registries
    (:mod:`diffexp.registry`: paths, samplers, densities, weightings, and the modules, nets, conditioners, spaces,
    encoders, autoencoders, data modules and optimizers marked ``register_part``), under each name that imports
    them. A part defined outside the package joins by registering itself. Nothing that runs commands or reads
    arbitrary files (a diffexp class that loads a file named in its arguments reads it with weights_only=True)."""
    import diffexp.autoencoders  # noqa: F401  (each module registers its parts when imported)
    import diffexp.conditioning  # noqa: F401
    import diffexp.data  # noqa: F401
    import diffexp.lit  # noqa: F401
    import diffexp.nets  # noqa: F401
    import diffexp.objectives  # noqa: F401
    import diffexp.paths  # noqa: F401
    import diffexp.samplers  # noqa: F401
    import diffexp.schedules  # noqa: F401
    import diffexp.spaces  # noqa: F401
    import diffexp.text  # noqa: F401
    from diffexp.registry import REGISTRIES, import_names

    return frozenset(name for registry in REGISTRIES for part in registry.values() if callable(part)
                     for name in import_names(part))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, not ours, unsafe or non-finite."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose loading could run code (never loaded, never skipped over silently)."""


def load_file(path: str | Path, option: str = "ckpt", legacy_format: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only, never code; a clear
    :class:`CheckpointError` (naming ``option``) for a file that is not a readable checkpoint. ``legacy_format``
    also accepts torch's pre-1.6 (non-zip) files, as some published weights are."""
    if not legacy_format and Path(path).is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{option}={str(path)!r} is not a readable checkpoint (not a file torch.save wrote, or "
                              f"one cut short)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise UnsafeCheckpointError(f"{option}={str(path)!r} holds objects other than tensors and plain data, which could "
                                    f"run code when loaded, so it was not loaded{what}") from None
    except Exception as e:  # truncated zip, a text file, ...: torch raises many kinds
        raise CheckpointError(f"{option}={str(path)!r} is not a readable checkpoint (truncated or not a torch file: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{option}={str(path)!r} is not a checkpoint (it holds a {type(data).__name__})")
    return data


def check_targets(cfg: dict, option: str = "ckpt", nodes=MODEL_NODES) -> None:
    """Refuse a stored config whose ``nodes`` would instantiate anything outside :func:`allowed_targets` when the
    model is rebuilt."""
    allowed = allowed_targets()

    def walk(node, where):
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and target not in allowed:
                raise UnsafeCheckpointError(f"{option}: the stored config names _target_={target!r} at {where}, which is not "
                                      f"one of the classes a diffexp model is built from; refusing to instantiate it")
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk_strings(cfg, "config", option)  # an interpolation anywhere could pull a hostile node into a checked one
    for key in nodes:
        walk(cfg.get(key), key)


def walk_strings(node, where: str, option: str) -> None:
    """Refuse ``${...}`` interpolations anywhere in ``node``."""
    if isinstance(node, str) and "${" in node:
        raise UnsafeCheckpointError(f"{option}: the stored config holds an interpolation at {where} ({node[:60]!r}); "
                                    f"train.py stores resolved configs, so this file was edited; refusing it")
    if isinstance(node, dict):
        for key, value in node.items():
            walk_strings(value, f"{where}.{key}", option)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            walk_strings(value, f"{where}[{i}]", option)


def non_finite_tensors(state: dict) -> list[str]:
    """Names of floating-point tensors in ``state`` holding NaN or inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


TEMP_MARK = ".tmp-"
WEIGHTS_NAME = "model.safetensors"
EXTRA_STATE_KEY = "diffexp_extra_state"


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(temp)`` into a temp file in the same directory, fsync, then os.replace: ``path`` is either the old
    file or the complete new one, whatever moment the process is killed (a temp file in another filesystem,
    such as $TMPDIR on tmpfs, would make the final move a copy that a kill can truncate)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would (some writers create 0600 files)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_weights(state_dict: dict, run_config: dict, path: str | Path) -> Path:
    """The weights-only artefact (``RUN/checkpoints/model.safetensors``): the tensors of ``state_dict`` in
    safetensors (which cannot hold code), the run config, the format version and the non-tensor module state
    (a learned tokenizer's vocabulary, monitoring captions) as JSON metadata. ``sample.py ckpt=`` reads it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().clone() for k, v in state_dict.items() if torch.is_tensor(v)}
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]})")
    extra = {k: v for k, v in state_dict.items() if not torch.is_tensor(v)}
    metadata = {CONFIG_KEY: json.dumps(run_config), FORMAT_KEY: str(FORMAT), EXTRA_STATE_KEY: json.dumps(extra)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_weights(path: Path, option: str = "ckpt") -> dict:
    """A weights-only artefact (:func:`save_weights`) as a checkpoint dict {config, format, state_dict}."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{option}={str(path)!r} is not a readable safetensors file ({type(e).__name__})") from None
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{option}={str(path)!r} carries no diffexp config; was it written by train.py?")
    state.update(json.loads(metadata.get(EXTRA_STATE_KEY, "{}")))
    return {CONFIG_KEY: json.loads(metadata[CONFIG_KEY]), FORMAT_KEY: int(metadata.get(FORMAT_KEY, FORMAT)),
            "state_dict": state}


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict:
    """The checkpoint dict at ``path`` in the current layout, read without running code and with its stored
    config checked against :func:`allowed_targets`; a clear error (naming ``option``) if it is missing, not
    ours or unsafe."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{option}={str(path)!r} is a directory; pass a checkpoint file in it, e.g. "
                                f"{option}={str(path / 'last.ckpt')!r} or model.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"{option}={str(path)!r} does not exist; pass a checkpoint written by train.py, "
                                f"e.g. {option}=logs/train/latest/checkpoints/last.ckpt")
    checkpoint = read_weights(path, option) if path.suffix == ".safetensors" else load_file(path, option)
    if CONFIG_KEY not in checkpoint:
        raise ValueError(f"{option}={str(path)!r} carries no diffexp config (key {CONFIG_KEY!r}); "
                         f"was it written by train.py?")
    if not isinstance(checkpoint[CONFIG_KEY], dict):
        raise CheckpointError(f"{option}={str(path)!r}: its stored config is not a mapping")
    upgrade_checkpoint(checkpoint)
    check_targets(checkpoint[CONFIG_KEY], option)
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
        model["_target_"] = "diffexp.lit.VAETraining"  # was diffexp.lit.vae.VAETraining
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


def upgrade_run_config_to_paths(cfg: dict) -> dict:
    """A format-2 run config in the format-3 layout: a diffusion model's discrete ``schedule`` becomes its ``path``
    (:class:`diffexp.paths.DiscretePath` of that schedule); its density and weighting stay the defaults they were
    (integer timesteps; min-SNR from ``min_snr_gamma``)."""
    cfg = copy.deepcopy(cfg)
    model = cfg.get("model", {})
    if model.get("_target_") == DIFFUSION_TARGET and "schedule" in model and "path" not in model:
        model["path"] = {"_target_": "diffexp.paths.DiscretePath", "schedule": model.pop("schedule")}
    return cfg


def upgrade_run_config_to_net(cfg: dict) -> dict:
    """A format-3 run config in the format-4 layout: the denoiser's node ``unet`` is named ``net`` (the group of
    every backbone: U-Nets and DiTs)."""
    cfg = copy.deepcopy(cfg)
    if "unet" in cfg and "net" not in cfg:
        cfg["net"] = cfg.pop("unet")
    return cfg


def fill_autoencoder(state: dict, own_state: dict) -> None:
    """A latent checkpoint written before checkpoints carried their autoencoder keeps the autoencoder weights the
    model was built with (from the VAE file its config names): they are copied from ``own_state`` into ``state``."""
    for key, value in own_state.items():
        if key.startswith("space.autoencoder.") and key not in state:
            state[key] = value


def _renamed(key: str) -> str:
    for old, new in RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """Bring a checkpoint dict to the current format in place (config, state dict, EMA state); returns it.

    Format 3 named the denoiser's config node ``unet`` where format 4 names it ``net``. Format 2 named a diffusion
    model's discrete ``schedule`` where format 3 names its ``path``. Format 1 kept the
    text encoder under ``text_encoder.``, the latent scale as ``latent_scale`` and the example captions beside the
    state dict; it did not carry the weights of an own VAE (the model fills
    them from the VAE file it was built with, see ``DiffusionModel.on_load_checkpoint``)."""
    version = checkpoint.get(FORMAT_KEY, 1)
    if version >= FORMAT:
        return checkpoint
    if version < 2:
        upgrade_to_format2(checkpoint)
    if version < 3:
        checkpoint[CONFIG_KEY] = upgrade_run_config_to_paths(checkpoint[CONFIG_KEY])
    checkpoint[CONFIG_KEY] = upgrade_run_config_to_net(checkpoint[CONFIG_KEY])
    checkpoint[FORMAT_KEY] = FORMAT
    return checkpoint


def upgrade_to_format2(checkpoint: dict) -> None:
    """Format 1 -> 2 in place (:func:`upgrade_checkpoint`)."""
    checkpoint[CONFIG_KEY] = upgrade_run_config(checkpoint[CONFIG_KEY])
    if checkpoint[CONFIG_KEY].get("model", {}).get("_target_") == DIFFUSION_TARGET:
        checkpoint["state_dict"] = {_renamed(k): v for k, v in checkpoint["state_dict"].items()}
        captions = checkpoint.pop("diffexp_example_captions", None)
        if checkpoint[CONFIG_KEY]["conditioning"]["_target_"].endswith("TextConditioner"):
            checkpoint["state_dict"]["conditioner._extra_state"] = {"example_captions": list(captions or [])}
        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, dict) and isinstance(state.get("ema_state"), dict):
                state["ema_state"] = {_renamed(k): v for k, v in state["ema_state"].items()}
