"""Train a diffusion model: `python train.py [experiment=quickstart] [group=option ...] [key=value ...]`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from diffexp.train import run_safely

    return run_safely(cfg)


if __name__ == "__main__":
    main()
