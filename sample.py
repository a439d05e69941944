"""Sample from a checkpoint: `python sample.py ckpt=PATH n=64 sampler=ddim sampler.steps=50 seed=0 out=DIR`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig):
    from diffexp.sample import run

    return run(cfg)


if __name__ == "__main__":
    main()
