"""Export a trained pixel model as a diffusers pipeline folder.

    python -m diffexp.export ckpt=logs/train/latest/checkpoints/last.ckpt out=exported/digits
    python -m diffexp.export ckpt=RUN/checkpoints/last.ckpt out=DIR ema=false overwrite=true   # raw weights
    python -m diffexp.export ckpt=RUN/checkpoints/model.safetensors out=DIR                    # the shared weights

Then, in any diffusers environment:

    from diffusers import DDIMPipeline
    images = DDIMPipeline.from_pretrained("exported/digits")(batch_size=16, num_inference_steps=50).images

The folder holds ``unet/`` (``UNet2DModel`` config + safetensors; EMA weights unless ``ema=false``),
``scheduler/`` (a DDPM path's betas exactly and the prediction type; a flow model's FlowMatchEulerDiscreteScheduler)
and ``model_index.json``
(``DDPMPipeline``). After writing, the export is loaded back with diffusers and compared with diffexp's network
on a random batch; the maximum difference is printed and stored in ``out/diffexp_export.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OPTIONS = {"ckpt": None, "out": None, "ema": "true", "overwrite": "false"}
BOOLEANS = {"true": True, "false": False}


def parse(argv: list[str]) -> dict:
    """``key=value`` arguments (the keys of :data:`OPTIONS`) as a dict; ValueError naming what is wrong."""
    values = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"unknown argument {arg!r}; usage: python -m diffexp.export ckpt=PATH out=DIR "
                             f"[ema=true|false] [overwrite=true|false]")
        values[key] = value
    for key in ("ckpt", "out"):
        if not values[key]:
            raise ValueError(f"{key}= is required: python -m diffexp.export ckpt=PATH out=DIR")
    for key in ("ema", "overwrite"):
        if values[key].lower() not in BOOLEANS:
            raise ValueError(f"{key}={values[key]!r}; allowed: true, false")
        values[key] = BOOLEANS[values[key].lower()]
    return values


def check_out(out: Path, overwrite: bool) -> None:
    """A clear error, before any work, for an ``out=`` that cannot become the export folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={str(out)!r} is a file; pass a folder to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out={str(out)!r} exists and is not empty; choose another folder or pass overwrite=true")
    resolved = out.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise ValueError(f"out={str(out)!r} is the current folder or one above it; pass a new folder for the export")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f"out={str(out)!r} cannot be created: {parent} is not a writable folder")


def weights_kind(ckpt: str, ema: bool) -> str:
    """Which weights ``load_model(ckpt, use_ema=ema)`` gives, "EMA" or "raw" (a model.safetensors holds the EMA
    weights when its run had EMA); a clear error for what export cannot use (a VAE, an adapter file, raw weights
    of a model.safetensors)."""
    from diffexp.callbacks.ema import ema_state_from_checkpoint
    from diffexp.checkpoints import CONFIG_KEY, read_checkpoint

    from diffexp.lora import is_adapter_key

    checkpoint = read_checkpoint(ckpt, "ckpt")
    if not any(k.startswith("net.") and not is_adapter_key(k) for k in checkpoint["state_dict"]):
        raise ValueError(f"ckpt={ckpt!r} holds no U-Net weights (a LoRA adapter file?); export the run's "
                         f"checkpoints/last.ckpt or model.safetensors, which carry the base weights and the adapters")
    if str(checkpoint[CONFIG_KEY].get("model", {}).get("_target_", "")).endswith("VAETraining"):
        raise ValueError(f"ckpt={ckpt!r} is an autoencoder (model=vae) checkpoint; export writes diffusion models "
                         f"(model=pixel) as diffusers pipelines")
    if Path(ckpt).suffix == ".safetensors":
        if not ema:
            raise ValueError(f"ema=false: {ckpt} holds only the weights train.py shares (EMA when the run had EMA); "
                             f"pass the run's checkpoints/last.ckpt for its raw weights")
        return "EMA" if (checkpoint[CONFIG_KEY].get("callbacks") or {}).get("ema") else "raw"
    return "EMA" if ema and ema_state_from_checkpoint(checkpoint) is not None else "raw"


def main(argv: list[str] | None = None) -> Path:
    from diffexp.errors import MissingPackageError
    from diffexp.interop import InteropError, export_pipeline
    from diffexp.api import load_model

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        out = Path(args["out"])
        check_out(out, args["overwrite"])
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise MissingPackageError("export writes a diffusers pipeline: pip install -e '.[diffusers]'") from None
        kind = weights_kind(args["ckpt"], args["ema"])
        model, _ = load_model(args["ckpt"], use_ema=args["ema"])
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, InteropError, MissingPackageError) as e:
        sys.exit(f"error: {e}")
    try:
        diff = export_pipeline(model, out, overwrite=args["overwrite"])
    except (ValueError, FileExistsError, InteropError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: out={args['out']!r} cannot be written ({e.strerror or e}); nothing was exported")
    record = {"ckpt": str(args["ckpt"]), "weights": kind, "max_abs_diff_vs_diffexp": diff,
              "prediction_type": model.prediction_type, "path": repr(model.path),
              "num_train_timesteps": model.path.num_timesteps}
    (out / "diffexp_export.json").write_text(json.dumps(record, indent=2) + "\n")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    print(f"[diffexp] exported {args['ckpt']} ({kind} weights) to {out}: UNet2DModel + {scheduler} "
          f"({model.prediction_type}); max |diffusers - diffexp| on a random batch = {diff:.2e}")
    pipeline = "DDIMPipeline" if scheduler == "DDPMScheduler" else "DDPMPipeline"
    print(f"  from diffusers import {pipeline}; {pipeline}.from_pretrained({str(out)!r})(batch_size=16)")
    return out


if __name__ == "__main__":
    main()
