"""Train a diffusion model: `python train.py [experiment=quickstart] [group=option ...] [key=value ...]`."""
import sys

import hydra
from omegaconf import DictConfig

from diffexp.config import exit_on_renamed_groups, quote_shard_patterns
from diffexp.distributed import secondary_process_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from diffexp.config import reported_errors
    from diffexp.train import run_safely

    with reported_errors():
        return run_safely(cfg)


if __name__ == "__main__":
    exit_on_renamed_groups(sys.argv[1:])
    sys.argv[1:] = quote_shard_patterns(sys.argv[1:])
    sys.argv += secondary_process_overrides(sys.argv[1:])  # only rank 0 of a multi-node job makes a run dir
    main()
