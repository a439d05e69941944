"""Sweeps, launchers, run comparison, determinism, exact resume and re-running a run from its directory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, SHRINK, compose_config, run_script

SMALL_DATA = ["data=shapes", "data.num_train=16", "data.num_val=8", "net.channel_mult=[1,2]"]  # 2 steps per epoch


def train_cli(args, cwd, timeout=900):
    return run_script("train.py", *args, cwd=cwd, timeout=timeout, check=True)


def weights(ckpt):
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    ema = next(v["ema_state"] for k, v in checkpoint["callbacks"].items() if k.startswith("EMA"))
    return checkpoint["state_dict"], ema, checkpoint


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def schedule_multirun(tmp_path_factory):
    """`train.py -m schedule=linear,quadratic,cosine` (3 tiny jobs), run once for this module."""
    tmp = tmp_path_factory.mktemp("multirun")
    sweep_dir = tmp / "sweep"
    train_cli(["-m", "schedule=linear,quadratic,cosine", *SHRINK, "paths.latest_link=null",
               f"hydra.sweep.dir={sweep_dir}"], tmp)
    return sweep_dir


@pytest.mark.xdist_group("schedule_multirun")  # the module's one sweep serves both
@pytest.mark.slow
def test_multirun_writes_three_run_dirs_and_the_comparison_table(schedule_multirun, tmp_path):
    from diffexp.compare import compare

    jobs = sorted(p.name for p in schedule_multirun.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1", "2"]
    for job in jobs:
        assert (schedule_multirun / job / "checkpoints" / "last.ckpt").is_file()
        info = json.loads((schedule_multirun / job / "run_info.json").read_text())
        assert info["seed"] == 42 and "commit" in info["git"] and info["packages"]["torch"]
        assert info["effective_batch_size"] == 8
    result = subprocess.run([sys.executable, "-m", "diffexp.compare", str(schedule_multirun), "--out",
                             str(tmp_path / "cmp")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "cmp" / "compare.md").read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["job", "schedule", "status"] and "val/loss" in header and "train/loss" in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[1] for r in rows] == ["linear", "quadratic", "cosine"] and all(r[2] == "ok" for r in rows)
    csv_rows = (tmp_path / "cmp" / "compare.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 4
    assert (tmp_path / "cmp" / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "metrics_by_option.png").stat().st_size > 0
    # the val/loss values in the table are the jobs' last logged ones
    from diffexp.compare import read_metrics

    col = header.index("val/loss")
    for job, row in zip(jobs, rows):
        assert float(row[col]) == pytest.approx(read_metrics(schedule_multirun / job)["val/loss"][-1][1], rel=1e-3)
    assert len(compare(schedule_multirun, tmp_path / "again")["jobs"]) == 3


def test_compare_reports_a_missing_directory(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffexp.compare", str(tmp_path / "nope")], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "is not a directory" in result.stderr


@pytest.mark.xdist_group("schedule_multirun")  # the module's one sweep serves both
@pytest.mark.slow
def test_rerun_from_the_run_directory_reproduces_the_weights(schedule_multirun, tmp_path):
    job = schedule_multirun / "1"
    train_cli(["--config-dir", str(job / ".hydra"), "--config-name", "config", f"hydra.run.dir={tmp_path / 'rerun'}"],
              tmp_path)
    original, original_ema, ckpt = weights(job / "checkpoints" / "last.ckpt")
    rerun, rerun_ema, _ = weights(tmp_path / "rerun" / "checkpoints" / "last.ckpt")
    assert ckpt["diffexp_config"]["schedule"]["name"] == "quadratic"
    assert_same_tensors(original, rerun)
    assert_same_tensors(original_ema, rerun_ema)


def test_slurm_launcher_and_optuna_sweeper_configs_compose(tmp_path):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        slurm = hydra_compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2"],
                              return_hydra_config=True)
        optuna = hydra_compose("train", ["hparams_search=digits_optuna"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_ == "hydra_plugins.diffexp_slurm.launcher.SlurmLauncher"
    assert slurm.hydra.launcher.nodes is None  # null: follows trainer.num_nodes when the sweep is launched
    assert slurm.trainer.strategy == "ddp" and slurm.trainer.num_nodes == 2
    assert "Optuna" in optuna.hydra.sweeper._target_ and optuna.hydra.sweeper.direction == "minimize"
    assert set(optuna.hydra.sweeper.params) == {"model.optimizer.lr", "callbacks.ema.decay", "model.min_snr_gamma"}
    assert optuna.optimized_metric == "val/fid_digits" and "fid" in optuna.callbacks
    # and through the CLI, as the issue asks: --cfg job prints the composed job config
    for args in (["hparams_search=digits_optuna"], ["hydra/launcher=slurm", "trainer=ddp"]):
        result = train_cli([*args, "--cfg", "job"], tmp_path, timeout=120)
        assert "optimized_metric" in result.stdout


def test_schedule_sweep_preset_sweeps_schedules_and_samplers(tmp_path):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", ["experiment=schedule_sweep"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"schedule": "linear,quadratic,cosine", "sampler": "ddim,ddpm"}
    assert cfg.optimized_metric == "val/fid_digits" and cfg.callbacks.fid.sampler.steps == 50


@pytest.mark.slow
def test_same_seed_gives_identical_runs_and_another_seed_does_not(tmp_path):
    from diffexp.compare import read_metrics
    from diffexp.train import run

    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run(compose_config("train", SHRINK + SMALL_DATA + [f"seed={seed}", "paths.latest_link=null"], tmp_path / name))
    a, a_ema, _ = weights(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b, b_ema, _ = weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    c, _, _ = weights(tmp_path / "c" / "checkpoints" / "last.ckpt")
    assert_same_tensors(a, b)
    assert_same_tensors(a_ema, b_ema)
    assert read_metrics(tmp_path / "a")["train/loss"] == read_metrics(tmp_path / "b")["train/loss"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    from diffexp.compare import read_metrics
    from diffexp.train import run

    base = SHRINK + SMALL_DATA + ["paths.latest_link=null"]
    run(compose_config("train", base + ["trainer.max_steps=4"], tmp_path / "full"))
    run(compose_config("train", base + ["trainer.max_steps=2"], tmp_path / "stopped"))
    stopped_ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    run(compose_config("train", base + ["trainer.max_steps=4", f"ckpt_path={stopped_ckpt}"], tmp_path / "resumed"))
    full, full_ema, full_ckpt = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    resumed, resumed_ema, resumed_ckpt = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert full_ckpt["global_step"] == resumed_ckpt["global_step"] == 4
    assert_same_tensors(full, resumed)
    assert_same_tensors(full_ema, resumed_ema)
    full_losses = dict(read_metrics(tmp_path / "full")["train/loss"])
    resumed_losses = dict(read_metrics(tmp_path / "resumed")["train/loss"])
    assert resumed_losses and all(full_losses[s] == v for s, v in resumed_losses.items())
    assert read_metrics(tmp_path / "full")["val/loss"][-1] == read_metrics(tmp_path / "resumed")["val/loss"][-1]


def test_each_rank_and_step_draws_its_own_noise():
    from types import SimpleNamespace

    from diffexp.lit import DiffusionModel
    from diffexp.nets import UNet
    from diffexp.schedules import get_schedule

    model = DiffusionModel(UNet(16, 1, base_channels=32, channel_mult=[1], attention_resolutions=[]),
                           get_schedule("linear"), noise_seed=3)
    draws = {}
    for rank in (0, 1):
        for step in (0, 1):
            model._trainer = SimpleNamespace(global_step=step, global_rank=rank)
            draws[rank, step] = torch.randn(4, generator=model.step_generator())
    assert len({tuple(v.tolist()) for v in draws.values()}) == 4
    model._trainer = SimpleNamespace(global_step=1, global_rank=1)
    assert torch.equal(torch.randn(4, generator=model.step_generator()), draws[1, 1])
