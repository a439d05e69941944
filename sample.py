"""Sample from a checkpoint: `python sample.py ckpt=PATH n=64 sampler=ddim sampler.steps=50 seed=0 out=DIR`."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffexp.config import exit_on_renamed_groups


def out_dir_overrides(args: list[str]) -> list[str]:
    """With ``out=DIR`` Hydra's run directory is DIR itself (no stray logs/sample/runs/<time>/); an ``out`` that
    is an existing file is left to sample.run's own check. The path is passed quoted (spaces, +, ...)."""
    out = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    if not out or not out[-1] or Path(out[-1].strip("'\"")).is_file():
        return []
    path = out[-1].strip("'\"")
    quoted = "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [f"hydra.run.dir={quoted}", "hydra.output_subdir=null"]


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig):
    from diffexp.config import reported_errors
    from diffexp.sample import run

    with reported_errors():
        return run(cfg)


if __name__ == "__main__":
    exit_on_renamed_groups(sys.argv[1:])
    sys.argv += out_dir_overrides(sys.argv[1:])
    main()
