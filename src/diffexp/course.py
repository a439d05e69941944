"""Helpers for notebooks and scripts: compose the real Hydra configs, train and load, without the CLI.

    from diffexp.course import compose, train, load
    ckpt = train(["experiment=quickstart", "trainer.max_steps=200"], "runs/nb")
    model, cfg = load(ckpt)
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, open_dict

from diffexp.config import CONF_DIR

# quiet, CPU-only, single-process settings for runs started from a notebook
NOTEBOOK_TRAINER = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
                    "trainer.enable_model_summary=false", "paths.latest_link=null"]


def compose(overrides: list[str], output_dir: str | Path, config_name: str = "train",
            root_dir: str | Path | None = None) -> DictConfig:
    """The config ``python train.py OVERRIDES`` would run with, its outputs in ``output_dir``
    (``paths.root_dir``, where logs/ and the latest-run link live: ``root_dir`` or the working directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    output_dir = Path(output_dir).resolve()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if root_dir is not None:
            cfg.paths.root_dir = str(root_dir)
        del cfg.hydra
    return cfg


def notebook_settings() -> tuple[bool, Path, Path]:
    """(fast, runs_dir, figures_dir) for a course notebook: ``DIFFEXP_NOTEBOOK_MODE=ci`` selects the quick
    settings; runs go to ``$DIFFEXP_NOTEBOOK_RUNS/<mode>`` (default runs/), figures to ``$DIFFEXP_FIGURES``
    (default figures/, created)."""
    mode = os.environ.get("DIFFEXP_NOTEBOOK_MODE", "course")
    figures = Path(os.environ.get("DIFFEXP_FIGURES", "figures"))
    figures.mkdir(parents=True, exist_ok=True)
    return mode == "ci", Path(os.environ.get("DIFFEXP_NOTEBOOK_RUNS", "runs")) / mode, figures


def train(overrides: list[str], output_dir: str | Path, steps: int | None = None, reuse: bool = True) -> Path:
    """Train as ``python train.py OVERRIDES`` would (CPU, quiet) and return the last checkpoint;
    ``steps`` makes it a ``steps``-step run whose validation, grids and checkpoint (``eval_every``) fire at the end.

    With ``reuse`` an existing ``output_dir/checkpoints/last.ckpt`` is returned without training again.
    """
    from diffexp.train import run

    ckpt = Path(output_dir) / "checkpoints" / "last.ckpt"
    if reuse and ckpt.is_file():
        return ckpt
    length = [f"trainer.max_steps={steps}", f"eval_every={steps}"] if steps else []
    run(compose(NOTEBOOK_TRAINER + list(overrides) + length, output_dir))
    return ckpt


def net_preset(name: str, image_size: int, in_channels: int, context_dim: int | None = None, **options):
    """The denoiser of ``conf/net/<name>.yaml`` (a U-Net or a DiT) at the given size, other ``net.`` options from
    ``options`` (a clear error for unknown presets)."""
    from hydra.utils import instantiate

    cfg = net_preset_config(name)
    cfg.image_size, cfg.in_channels, cfg.context_dim = image_size, in_channels, context_dim
    for key, value in options.items():
        cfg[key] = value
    cfg.pop("init_from", None)  # a diffusers model to import is train.py's business (diffexp.config)
    return instantiate(cfg)


def net_preset_config(name: str):
    """``conf/net/<name>.yaml`` as a config, with the presets it builds on (its ``defaults``) merged under it."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "net" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"net preset {name!r} does not exist; choose from {sorted(p.stem for p in path.parent.glob('*.yaml'))}")
    cfg = OmegaConf.load(path)
    bases = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*[net_preset_config(b) for b in bases], cfg) if bases else cfg


def data_of(cfg: DictConfig):
    """The datamodule of a checkpoint's training config (e.g. the reference data for FID in
    :func:`diffexp.metrics.evaluate`), built only through allow-listed targets."""
    from diffexp.config import data_of_run

    return data_of_run(cfg)


def load(ckpt: str | Path, use_ema: bool = True):
    """(model in eval mode, its training config) from a checkpoint."""
    from diffexp.api import load_model

    return load_model(ckpt, use_ema=use_ema)


def pretrained(name: str):
    """(model in eval mode, its training config) of the course model ``name`` shipped with diffexp (see
    :data:`diffexp.pretrained.MODELS` for the names; shapes_vae gives its
    :class:`~diffexp.nets.AutoencoderKL`). Offline: the weights are in the package."""
    from omegaconf import OmegaConf

    from diffexp.autoencoders import load_autoencoder
    from diffexp.checkpoints import CONFIG_KEY, read_checkpoint
    from diffexp.pretrained import path

    weights = path(name)
    if name == "shapes_vae":
        return load_autoencoder(weights), OmegaConf.create(read_checkpoint(weights)[CONFIG_KEY])
    return load(weights)


def pretrained_or_train(name: str, overrides: list[str], output_dir: str | Path, steps: int | None = None,
                        own: bool | None = None) -> Path:
    """The weights a course notebook uses: the shipped model ``name`` (:func:`pretrained`), or, with ``own`` (default:
    ``DIFFEXP_NOTEBOOK_TRAIN=1``) or when it is not shipped, a run of ``overrides`` trained here (:func:`train`)."""
    from diffexp.pretrained import available, path

    own = os.environ.get("DIFFEXP_NOTEBOOK_TRAIN", "0") == "1" if own is None else own
    if not own and name in available():
        return path(name)
    return train(overrides, output_dir, steps=steps)


def sampler(model, name: str = "dpmpp_2m", steps: int | None = None, **options):
    """The sampler ``name`` (the names of ``sampler=`` on the command line: ddim, dpmpp_2m, unipc, heun, ...) for
    ``model``'s schedule and prediction type, with ``steps`` steps (None: the sampler's default) and ``options``
    as in ``conf/sampler/<name>.yaml``; no progress bar unless ``progress=True``."""
    from functools import partial

    from diffexp.samplers import SAMPLERS

    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not a known sampler; choose one of {sorted(SAMPLERS)}")
    options.setdefault("progress", False)
    if steps is not None:
        options["steps"] = steps
    return model.make_sampler(partial(SAMPLERS[name], **options))
