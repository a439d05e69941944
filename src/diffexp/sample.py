"""sample.py's run(cfg): rebuild a model from its checkpoint alone (:mod:`diffexp.api`), sample, write grid.png and
samples.npz."""
from __future__ import annotations

import fcntl
import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffexp.api import draw_samples, load_model, make_guider, resolve_device, sampling_conditions
from diffexp.config import check_number, data_of_run, instantiate
from diffexp.editing import edit_start
from diffexp.images import load_image, save_grid, to_uint8_nhwc
from diffexp.lit.diffusion import COMPILE_MODES
from diffexp.precision import check_precision


OUTPUTS = ("grid.png", "samples.npz", "metrics.json")
LOCK_NAME = ".sample.lock"


@contextmanager
def claimed_out_dir(out: str | Path, overwrite: bool):
    """The output directory, claimed for this run with an exclusive lock (so two sample.py runs on one ``out=``
    cannot interleave) and refusing to overwrite earlier samples unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={str(out)!r} is a file; pass a directory for grid.png and samples.npz")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK_NAME, "w")  # an flock dies with its process: a killed run blocks no one
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FileExistsError(f"another sample.py is writing to out={str(out)!r}; wait for it or choose another "
                              f"out=DIR") from None
    try:
        existing = [name for name in OUTPUTS if (out / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"out={str(out)!r} already holds {existing}; choose another out=DIR or pass "
                                  f"overwrite=true")
        yield out
    finally:
        (out / LOCK_NAME).unlink(missing_ok=True)
        lock.close()


def read_prompts(cfg, n: int) -> list[str] | None:
    """``prompt=...`` (one caption for all n) or ``prompts_file=PATH`` (one per line, cycled to n)."""
    if cfg.get("prompt") and cfg.get("prompts_file"):
        raise ValueError("pass either prompt=... or prompts_file=..., not both")
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={str(path)!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file={str(path)!r} holds no prompts")
        return [prompts[i % len(prompts)] for i in range(n)]
    if cfg.get("prompt") is not None:
        return [str(cfg.prompt)] * n
    return None


NPZ_NAMES = {"class_labels": "labels"}  # condition name -> array name in samples.npz
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_mask(path: str | Path, inputs: torch.Tensor | None, init_files: list[Path] = ()) -> torch.Tensor:
    """``mask=``: a grayscale image, white = regenerate, of the init images' size (checked against their files),
    resized with them to the model's images, as (1, 1, H, W) in [0, 1]."""
    from PIL import Image

    if inputs is None:
        raise ValueError("mask=... inpaints init images: pass init_image=FILE|DIR too")
    if Path(path).is_dir():
        raise ValueError(f"mask={str(path)!r} is a directory; pass one grayscale image file")
    try:
        mask = (load_image(path, size=inputs.shape[-1], grayscale=True)[None] + 1) / 2
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"mask={str(path)!r}: {error}") from None
    mask_size = Image.open(path).size
    other = [f"{f.name} ({w}x{h})" for f in init_files for w, h in [Image.open(f).size] if (w, h) != mask_size]
    if other:
        raise ValueError(f"mask={str(path)!r} is {mask_size[0]}x{mask_size[1]} pixels but init_image is not: "
                         f"{', '.join(other[:3])}; draw the mask at the size of the image it masks")
    return mask


def init_image_files(path: str | Path) -> list[Path]:
    """``init_image=``: the file, or the PNG/JPEG files of the directory in sorted order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_image={str(path)!r} does not exist; pass a PNG/JPEG file or a directory of them")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"init_image={str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def read_init_images(path: str | Path, model, n: int) -> tuple[torch.Tensor, list[Path]]:
    """``init_image=``: one PNG/JPEG file or every one in a directory (sorted), resized to the model's images
    (grayscale for 1-channel pixel models), in [-1, 1], and the files; ``n`` must be a multiple of their number."""
    files = init_image_files(path)
    if n % len(files):
        raise ValueError(f"n={n} must be a multiple of the {len(files)} init images (n edits per image: n / images)")
    size = getattr(model.space, "image_size", None) or model.sample_shape[-1]
    grayscale = model.space.bounded and model.sample_shape[0] == 1
    try:
        return torch.stack([load_image(f, size=size, grayscale=grayscale) for f in files]), files
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"init_image={str(path)!r}: {error}") from None


def run(cfg: DictConfig) -> dict:
    """Sample ``cfg.n`` images from ``cfg.ckpt``; write grid.png, samples.npz (and metrics.json)."""
    if cfg.ckpt is None:
        raise ValueError("ckpt=PATH is required (a checkpoint written by train.py)")
    if not isinstance(cfg.n, int) or isinstance(cfg.n, bool) or cfg.n <= 0:
        raise ValueError(f"n must be a positive number of samples, got {cfg.n!r}")
    check_number("seed", cfg.seed, integer=True)
    check_number("batch_size", cfg.batch_size, integer=True, positive=True)
    check_number("guidance_scale", cfg.get("guidance_scale"), minimum=0, allow_none=True)
    check_number("guidance_rescale", cfg.get("guidance_rescale"), minimum=0, maximum=1, allow_none=True)
    check_number("grid_scale", cfg.grid_scale, integer=True, positive=True)
    check_number("grid_max", cfg.grid_max, integer=True, positive=True)
    check_number("strength", cfg.get("strength"), minimum=0, maximum=1, allow_none=True)
    check_number("jump_length", cfg.get("jump_length", 10), integer=True, positive=True)
    check_number("jump_n_sample", cfg.get("jump_n_sample", 1), integer=True, positive=True)
    if not isinstance(cfg.get("lora_merge", False), bool):
        raise ValueError(f"lora_merge must be true or false, got {cfg.lora_merge!r}")
    if not isinstance(cfg.use_ema, bool):
        raise ValueError(f"use_ema must be true or false, got {cfg.use_ema!r}")
    check_precision(cfg.get("precision", "auto"), "precision")
    if not isinstance(cfg.get("compile", False), bool):
        raise ValueError(f"compile must be true or false, got {cfg.compile!r}")
    if cfg.get("compile_mode") not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if cfg.get("metrics"):
        from diffexp.metrics import check_metric_names

        check_metric_names(cfg.metrics)  # before sampling, not after
    device = resolve_device(cfg.device)
    with claimed_out_dir(cfg.out, cfg.overwrite) as out:
        return sample_into(cfg, out, device)


def sample_into(cfg: DictConfig, out: Path, device: torch.device) -> dict:
    model, train_cfg = load_model(cfg.ckpt, use_ema=cfg.use_ema, device=device)
    if cfg.get("lora"):
        from diffexp.finetune import load_adapter

        load_adapter(model, cfg.lora, merge=cfg.get("lora_merge", False))
        model.to(device).eval()
    elif cfg.get("lora_merge"):
        warnings.warn("lora_merge=true has no effect without lora=ADAPTER", stacklevel=2)
    model.sample_precision = cfg.get("precision", "auto")
    if cfg.get("compile", False):
        model.speed_up(compile=True, mode=cfg.get("compile_mode"))
    elif cfg.get("compile_mode"):
        warnings.warn(f"compile_mode={cfg.compile_mode} has no effect without compile=true", stacklevel=2)
    sampler = model.make_sampler(instantiate(cfg.sampler) if cfg.get("sampler") else None)
    conditions = sampling_conditions(model, read_prompts(cfg, cfg.n), cfg.n)
    guider = make_guider(cfg.guider, model) if cfg.get("guider") else None
    if not model.conditioner.conditional and not (guider is not None and guider.needs_guide):
        if cfg.get("guidance_scale") not in (None, 1, 1.0):
            warnings.warn(f"guidance_scale={cfg.guidance_scale} has no effect: this model is unconditional",
                          stacklevel=2)
        if guider is not None and guider.name != "cfg":
            warnings.warn(f"guider={guider.name} has no effect: this model is unconditional (guider=auto guides "
                          f"unconditional models too)", stacklevel=2)
    inputs, files = read_init_images(cfg.init_image, model, cfg.n) if cfg.get("init_image") else (None, [])
    if inputs is None and cfg.get("strength") is not None:
        warnings.warn(f"strength={cfg.strength} has no effect without init_image=...", stacklevel=2)
    mask = read_mask(cfg.mask, inputs, files) if cfg.get("mask") else None
    strength = cfg.get("strength")
    strength = strength if strength is not None else (1.0 if mask is not None else 0.6)  # inpainting: from noise
    resampling = {"jump_length": cfg.get("jump_length", 10), "jump_n_sample": cfg.get("jump_n_sample", 1)}
    if mask is None and resampling["jump_n_sample"] != 1:
        warnings.warn(f"jump_n_sample={resampling['jump_n_sample']} (RePaint resampling) has no effect without "
                      f"mask=...", stacklevel=2)
        resampling["jump_n_sample"] = 1
    first_step = edit_start(sampler, strength) if inputs is not None else 0
    if inputs is not None and resampling["jump_n_sample"] > 1 and \
            sampler.nfe(first_step, **resampling) == sampler.nfe(first_step):
        steps = len(sampler.timesteps) - first_step
        warnings.warn(f"jump_n_sample={resampling['jump_n_sample']} resamples nothing: of the {steps} steps run, "
                      f"none lies jump_length={resampling['jump_length']} steps after the start; use a jump_length "
                      f"below {steps}", stacklevel=2)
    start, batch_seconds = time.perf_counter(), []
    images = draw_samples(model, cfg.n, sampler, cfg.seed, cfg.batch_size, conditions, cfg.progress,
                          cfg.get("guidance_scale"), cfg.get("guidance_rescale"), batch_seconds,
                          None if inputs is None else inputs.repeat_interleave(cfg.n // len(inputs), 0),
                          strength, mask, resampling, guider=guider)
    seconds = time.perf_counter() - start
    if not torch.isfinite(images).all():
        warnings.warn(f"{int((~torch.isfinite(images)).flatten(1).any(1).sum())} of {cfg.n} samples hold NaN/inf",
                      stacklevel=2)
    if inputs is not None:  # a row per input image: the input, then its edits
        rows = torch.cat([inputs[:, None].cpu(), images.view(len(inputs), -1, *images.shape[1:])], dim=1)
        save_grid(rows[: max(1, cfg.grid_max // rows.shape[1])], out / "grid.png", scale=cfg.grid_scale)
    else:
        save_grid(images[: cfg.grid_max], out / "grid.png", scale=cfg.grid_scale)
    arrays = {"images": to_uint8_nhwc(images), **{NPZ_NAMES.get(k, k): np.array(v) for k, v in conditions.items()}}
    np.savez_compressed(out / "samples.npz", **arrays)
    captions = conditions.get("captions")
    warm = cfg.n - min(cfg.n, cfg.batch_size)  # images after the first batch (which compiles, autotunes)
    summary = {"n": cfg.n, "seconds": round(seconds, 3), "images_per_second": round(cfg.n / seconds, 2),
               "images_per_second_after_first_batch": round(warm / sum(batch_seconds[1:]), 2) if warm else None,
               "precision": model.resolved_precision(model.sample_precision), "compile": bool(cfg.get("compile", False)), "device": str(device),
               "sampler": OmegaConf.to_container(cfg.sampler) if cfg.get("sampler") else None,
               "timestep_spacing": getattr(sampler, "timestep_spacing", None), "path": repr(model.path),
               "nfe": sampler.nfe(first_step, **resampling),
               "ckpt": str(cfg.ckpt), "seed": cfg.seed,
               "init_image": str(cfg.init_image) if inputs is not None else None,
               "strength": strength if inputs is not None else None,
               "mask": str(cfg.mask) if mask is not None else None,
               "lora": str(cfg.lora) if cfg.get("lora") else None,
               "lora_merge": bool(cfg.get("lora_merge", False)) if cfg.get("lora") else None,
               **({"jump_length": resampling["jump_length"], "jump_n_sample": resampling["jump_n_sample"]}
                  if mask is not None else {}),
               "guidance_scale": cfg.get("guidance_scale") if model.conditioner.conditional else None,
               "guider": None if guider is None or not (model.conditioner.conditional or guider.needs_guide)
               else repr(model.guider_for(guider, cfg.get("guidance_scale"), cfg.get("guidance_rescale"))),
               "net_passes_per_image": getattr(model, "last_net_passes", None),
               "prompts": list(dict.fromkeys(captions)) if captions is not None and len(set(captions)) <= 16 else None}
    if cfg.get("metrics"):
        from diffexp.metrics import evaluate, needs_reference

        datamodule = data_of_run(train_cfg) if needs_reference(cfg.metrics) else None
        summary["metrics"] = evaluate(list(cfg.metrics), images, datamodule, device=device, captions=captions)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))  # timing, sampler and NFE even without metrics
    print(json.dumps(summary, indent=2))
    print(f"[diffexp] wrote {out / 'grid.png'} and {out / 'samples.npz'}")
    return summary
