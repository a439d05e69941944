"""Build the model a training config describes and write its weights-only file, without data or training.

    python -m diffexp.build experiment=imagenet256_dit_xl2 out=weights/dit_xl2_256.safetensors
    python -m diffexp.build data=cifar10 net=base net.init_from=google/ddpm-cifar10-32 out=weights/ddpm_cifar10.safetensors

Every argument but ``out=`` and ``overwrite=`` is an override of ``train.py``'s config, so the model is the one
``python train.py ARGS`` would start from (imported weights of ``net.init_from``, a pretrained VAE or text
encoder). The file is what training writes as ``RUN/checkpoints/model.safetensors`` (the composed config in its
metadata): ``python sample.py ckpt=OUT`` samples from it and ``python train.py init_from=OUT`` fine-tunes it. The
config must not need the data to build the model (a class-conditional one sets ``conditioning.num_classes``).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

USAGE = "usage: python -m diffexp.build [train.py overrides ...] out=PATH.safetensors [overwrite=true|false]"


def parse(argv: list[str]) -> tuple[list[str], Path, bool]:
    """(train.py overrides, out, overwrite) of the arguments; ValueError naming what is wrong."""
    overrides, out, overwrite = [], None, False
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key == "out" and sep:
            out = Path(value)
        elif key == "overwrite" and sep:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"overwrite={value!r}; allowed: true, false")
            overwrite = value.lower() == "true"
        else:
            overrides.append(arg)
    if out is None or not str(out):
        raise ValueError(f"out= is required; {USAGE}")
    if out.suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r} must end in .safetensors (the weights-only format sample.py reads)")
    if out.is_dir():
        raise ValueError(f"out={str(out)!r} is a directory; pass a file path ending in .safetensors")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r} exists; pass overwrite=true to replace it")
    return overrides, out, overwrite


def build_weights(overrides: list[str], out: Path) -> Path:
    """Compose ``train.py``'s config with ``overrides``, build its model and write ``out`` (:func:`save_weights`)."""
    from omegaconf import OmegaConf

    from diffexp.checkpoints import save_weights
    from diffexp.config import build_model
    from diffexp.course import compose

    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose(overrides, output_dir=scratch)
        model = build_model(cfg)
        run_config = OmegaConf.to_container(cfg, resolve=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(model.state_dict(), run_config, out)


def main(argv: list[str] | None = None) -> Path:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from diffexp.errors import MissingPackageError
    from diffexp.interop import InteropError

    try:
        overrides, out, _ = parse(sys.argv[1:] if argv is None else argv)
        path = build_weights(overrides, out)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, InteropError, MissingPackageError,
            HydraException, OmegaConfBaseException) as e:
        sys.exit(f"error: {e}")
    print(f"[diffexp] wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); sample with: "
          f"python sample.py ckpt={path}")
    return path


if __name__ == "__main__":
    main()
