"""End to end: train a few steps, sample from the checkpoint, multirun, and clear errors for bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from diffexp.checkpoints import CONFIG_KEY
from tests.conftest import compose_config, run_script


def test_training_run_writes_everything(tiny_checkpoint):
    run_dir = tiny_checkpoint.parent.parent
    assert tiny_checkpoint.is_file()
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint[CONFIG_KEY]["schedule"]["name"] == "linear"
    assert any(k.startswith("EMA") for k in checkpoint["callbacks"])
    assert sorted(p.name for p in (run_dir / "images").glob("samples_step*.png"))
    metrics_csv = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics_csv and "val/loss" in metrics_csv
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 42 and "torch" in info["packages"]


@pytest.mark.slow
def test_sample_script_from_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "samples"
    args = [f"ckpt={tiny_checkpoint}", "n=6", "sampler.steps=3", f"out={out}", "progress=false", "seed=0",
            "device=cpu", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = run_script("sample.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8
    assert (out / "grid.png").is_file()

    again = run_script("sample.py", *args)  # never overwrite silently
    assert again.returncode != 0 and "overwrite=true" in again.stderr
    assert np.array_equal(np.load(out / "samples.npz")["images"], images)


@pytest.mark.slow
def test_sample_ddpm_and_metrics_in_process(tiny_checkpoint, tmp_path, monkeypatch):
    from diffexp.sample import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    cfg = compose_config("sample", [f"ckpt={tiny_checkpoint}", "n=3", "sampler=ddpm", "sampler.progress=false",
                                    "progress=false", "device=cpu", "metrics=[digits_classifier,fid_digits]"],
                         tmp_path / "out")
    summary = run(cfg)
    assert summary["n"] == 3 and summary["sampler"]["_target_"].endswith("DDPMSampler")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["metrics"]["fid_digits"]["n"] == 3 and saved["metrics"]["fid_digits"]["value"] > 0
    assert sum(saved["metrics"]["digits_classifier"]["class_counts"]) == 3
    assert len(list((tmp_path / "cache").glob("digits-train-16px-1ch-digits-*.pt"))) == 1


def test_same_noise_gives_same_samples(tiny_checkpoint):
    from diffexp.api import draw_samples, load_model

    model, _ = load_model(tiny_checkpoint)
    a = draw_samples(model, 4, None, seed=3, batch_size=2, progress=False)
    b = draw_samples(model, 4, None, seed=3, batch_size=4, progress=False)
    assert a.shape == (4, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_schedule_is_rejected(tmp_path):
    with pytest.raises(ConfigCompositionException, match="schedule"):
        compose_config("train", ["schedule=exponential"], tmp_path)
    result = run_script("train.py", "schedule=exponential", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "schedule" in result.stderr and "cosine" in result.stderr  # lists what is allowed


@pytest.mark.parametrize("override,error,match", [
    ("sampler.steps=0", ValueError, "sampler.steps must be a positive integer"),
    ("sampler.steps=-5", ValueError, "sampler.steps must be a positive integer"),
    ("data.image_size=18", ValueError, "image_size=18 cannot pass through a U-Net"),
    ("ckpt_path=/no/such/last.ckpt", FileNotFoundError, "ckpt_path"),
    ("model.prediction_type=score", ValueError, "prediction_type"),
])
def test_bad_train_overrides_fail_before_training(train_cfg, override, error, match):
    from diffexp.train import build

    with pytest.raises(error, match=match):
        build(train_cfg(override))


@pytest.mark.slow
def test_missing_checkpoint_for_sampling(tmp_path):
    result = run_script("sample.py", "ckpt=/no/such/model.ckpt", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "ckpt='/no/such/model.ckpt' does not exist" in result.stderr
    with pytest.raises(ValueError, match="ckpt=PATH is required"):
        from diffexp.sample import run

        run(compose_config("sample", [], tmp_path))
