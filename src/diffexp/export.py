"""Export a trained pixel model as a diffusers pipeline folder.

    python -m diffexp.export ckpt=logs/train/latest/checkpoints/last.ckpt out=exported/digits
    python -m diffexp.export ckpt=RUN/checkpoints/model.safetensors out=DIR ema=false overwrite=true

Then, in any diffusers environment:

    from diffusers import DDIMPipeline
    images = DDIMPipeline.from_pretrained("exported/digits")(batch_size=16, num_inference_steps=50).images

The folder holds ``unet/`` (``UNet2DModel`` config + safetensors; EMA weights unless ``ema=false``),
``scheduler/`` (the training schedule's betas exactly and the prediction type) and ``model_index.json``
(``DDPMPipeline``). After writing, the export is loaded back with diffusers and compared with diffexp's network
on a random batch; the maximum difference is printed and stored in ``out/diffexp_export.json``.
"""
from __future__ import annotations

import json
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
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={str(out)!r} is a file; pass a folder to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out={str(out)!r} exists and is not empty; choose another folder or pass overwrite=true")


def verify(model, out: Path, seed: int = 0) -> float:
    """max |UNet2DModel(out) - diffexp net| on a random batch of 4 at random timesteps."""
    import torch
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    net = model.net.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, net.in_channels, net.image_size, net.image_size, generator=g)
    t = torch.randint(0, model.schedule.num_timesteps, (4,), generator=g)
    with torch.no_grad():
        return float((unet(x, t).sample - net(x, t)).abs().max())


def main(argv: list[str] | None = None) -> Path:
    from diffexp.errors import MissingPackageError
    from diffexp.interop import InteropError, export_pipeline
    from diffexp.sample import load_model

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        out = Path(args["out"])
        check_out(out, args["overwrite"])
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise MissingPackageError("export writes a diffusers pipeline: pip install -e '.[diffusers]'") from None
        model, _ = load_model(args["ckpt"], use_ema=args["ema"])
        export_pipeline(model, out)
        diff = verify(model, out)
    except (ValueError, FileNotFoundError, FileExistsError, InteropError, MissingPackageError) as e:
        sys.exit(f"error: {e}")
    record = {"ckpt": str(args["ckpt"]), "ema": args["ema"], "max_abs_diff_vs_diffexp": diff,
              "prediction_type": model.prediction_type, "num_train_timesteps": model.schedule.num_timesteps}
    (out / "diffexp_export.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[diffexp] exported {args['ckpt']} ({'EMA' if args['ema'] else 'raw'} weights) to {out}: UNet2DModel + "
          f"DDPMScheduler ({model.prediction_type}); max |diffusers - diffexp| on a random batch = {diff:.2e}")
    print(f"  from diffusers import DDIMPipeline; DDIMPipeline.from_pretrained({str(out)!r})(batch_size=16)")
    return out


if __name__ == "__main__":
    main()
