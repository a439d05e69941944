"""Shared fixtures: composed and shrunk configs, a tiny trained checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from diffexp.course import compose

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# settings that make any training config finish in seconds on a CPU
SHRINK = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.batch_size=8",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.sample_grid.n=4",
    "callbacks.denoising_grid.every_n_steps=2",
    "callbacks.denoising_grid.num_images=2",
    "callbacks.denoising_grid.frames=3",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "sampler.steps=3",
    "sampler.progress=false",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a primary config as Hydra would for a run in ``output_dir``."""
    return compose(overrides, output_dir, config_name, root_dir=output_dir)


@pytest.fixture
def train_cfg(tmp_path):
    """Factory: compose train.yaml, shrunk, into tmp_path/run (extra overrides win)."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", SHRINK + list(overrides), tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a few quickstart training steps (trained once per test session)."""
    from diffexp.train import run

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_config("train", SHRINK, out)
    run(cfg)
    return out / "checkpoints" / "last.ckpt"
