"""Sample from a checkpoint: `python sample.py ckpt=PATH n=64 sampler=ddim sampler.steps=50 seed=0 out=DIR`."""
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def out_dir_overrides(args: list[str]) -> list[str]:
    """With ``out=DIR`` Hydra's run directory is DIR itself (no stray logs/sample/runs/<time>/); an ``out`` that
    is an existing file or needs quoting is left to sample.run's own checks."""
    out = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    if not out or not re.fullmatch(r"[\w./~-]+", out[-1]) or Path(out[-1]).is_file():
        return []
    return [f"hydra.run.dir={out[-1]}", "hydra.output_subdir=null"]


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig):
    from diffexp.config import reported_errors
    from diffexp.sample import run

    with reported_errors():
        return run(cfg)


if __name__ == "__main__":
    sys.argv += out_dir_overrides(sys.argv[1:])
    main()
