"""Callbacks and loggers: grids, FID during training (incl. 2-process DDP), W&B offline, several loggers."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from diffexp.callbacks import DenoisingGrid, FIDCallback
from diffexp.callbacks.fid import merge_rank_features, rank_indices
from diffexp.loggers import prepare_logger_configs
from tests.conftest import ROOT, SHRINK, compose_config


def read_csv_metrics(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def wandb_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", DIFFEXP_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    return env


FID_OVERRIDES = ["callbacks=[default,fid]", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=12",
                 "callbacks.fid.batch_size=5", "callbacks.fid.sampler.steps=2"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 7, 12])
def test_rank_split_and_merge_restore_sample_order(world, k):
    shares = [rank_indices(k, world, r) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # equal sizes, as all_gather needs
    gathered = torch.stack([s.double()[:, None] for s in shares])
    assert torch.equal(merge_rank_features(gathered, k)[:, 0], torch.arange(k).double())


def test_log_images_grids(tiny_checkpoint):
    """The module draws its own images: forward rows (x_t, x0_hat), reverse rows, samples; callbacks only send them."""
    from diffexp.api import load_model
    from diffexp.course import sampler as course_sampler

    model, _ = load_model(tiny_checkpoint)
    sampler = course_sampler(model, "ddim", steps=5)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    grids = model.log_images({"image": images}, samples=3, timesteps=(0, 500, 999), trajectories=1, frames=4,
                             sampler=sampler, seed=0, options_for_other_modules=True)
    assert set(grids) == {"samples", "denoising/forward", "denoising/reverse"}
    forward = grids["denoising/forward"]
    assert forward.shape == (2 * 2, 3, 1, 16, 16)  # per image: a row of x_t, a row of x0_hat
    assert torch.allclose(forward[0, 0], images[0], atol=0.05)  # x_t at t=0 is (nearly) the image itself
    reverse = grids["denoising/reverse"]
    assert reverse.shape == (2, 4, 1, 16, 16) and reverse.abs().max() <= 1
    x_T, cond = model.monitoring_inputs(3, 0)
    assert cond == {} and torch.equal(grids["samples"], model.sample(3, sampler=sampler, x_T=x_T, progress=False))
    assert model.log_images(None) == {}
    with pytest.raises(ValueError, match="outside"):
        model.log_images({"image": images}, timesteps=(1000,))
    with pytest.raises(ValueError, match="every_n_steps"):
        DenoisingGrid(every_n_steps=0)


@pytest.mark.slow
def test_training_with_wandb_offline_fid_and_images(tmp_path):
    """A tiny run with W&B (offline, not logged in), CSV and TensorBoard at once, and the FID callback."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *SHRINK, *FID_OVERRIDES,
                             "logger=[csv,wandb,tensorboard]", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=wandb_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "logging offline" in out and "wandb sync" in out
    history = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"val/fid_digits" in history and b"time/fid_seconds" in history
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    assert {p.name.split("_")[0] for p in media} >= {"samples", "forward", "reverse"}
    pngs = {p.name for p in (run_dir / "images").glob("*.png")}
    assert {"samples_step000002.png", "denoising_forward_step000004.png", "denoising_reverse_step000004.png"} <= pngs
    rows = [r for r in read_csv_metrics(run_dir) if r.get("val/fid_digits")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["time/fid_seconds"]) > 0 and float(r["fid/num_samples"]) == 12 for r in rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((tmp_path / "cache").glob("digits-train-16px-1ch-digits-*.pt"))) == 1


@pytest.mark.slow
def test_ddp_two_processes_fid_equals_single_process(tmp_path):
    """2 CPU processes (gloo): one checkpoint, synced metrics, FID equal to one process on the same samples."""
    from diffexp.callbacks.ema import ema_state_from_checkpoint
    from diffexp.checkpoints import CONFIG_KEY
    from diffexp.metrics.features import build_feature_extractor
    from diffexp.metrics.reference import reference_features
    from diffexp.api import load_model

    run_dir = tmp_path / "ddp"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *SHRINK, *FID_OVERRIDES, "trainer=ddp_cpu",
                             "trainer.max_steps=2", "logger=csv", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=wandb_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step0000002.ckpt"]
    ddp_fid = float(next(r for r in read_csv_metrics(run_dir) if r.get("val/fid_digits"))["val/fid_digits"])

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint[CONFIG_KEY]["trainer"]["devices"] == 2 and ema_state_from_checkpoint(checkpoint) is not None
    model, train_cfg = load_model(run_dir / "checkpoints" / "last.ckpt")
    fid_cfg = OmegaConf.create(checkpoint[CONFIG_KEY]["callbacks"]["fid"])
    from hydra.utils import instantiate

    cb = instantiate(fid_cfg)
    dm = instantiate(train_cfg.data)
    cb.extractors = {"digits": build_feature_extractor("digits")}
    cb.real = {"digits": reference_features(dm, cb.extractors["digits"], "digits", cache_dir=tmp_path / "cache")}
    single = cb.compute(cb.fake_features(model))
    assert single["fid_digits"] == pytest.approx(ddp_fid, rel=1e-4)


def test_wandb_offline_when_not_logged_in(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_config("train", ["logger=[csv,wandb]", "logger.wandb.group=sweep1", "tags=[a,b]"], tmp_path)
    assert set(cfg.logger) == {"csv", "wandb"}
    messages = prepare_logger_configs(cfg)
    assert cfg.logger.wandb.offline is True and messages
    assert cfg.logger.wandb.group == "sweep1" and list(cfg.logger.wandb.tags) == ["a", "b"]
    assert cfg.logger.wandb.name == tmp_path.name

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = compose_config("train", ["logger=wandb"], tmp_path)
    assert prepare_logger_configs(cfg) == [] and cfg.logger.wandb.offline is False


def test_fid_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="allowed"):
        FIDCallback(metrics=["fid_mnist"])
    with pytest.raises(ValueError, match="FID/KID metrics only"):
        FIDCallback(metrics=["digits_classifier"])
    with pytest.raises(ValueError, match="num_samples"):
        FIDCallback(num_samples=1)
