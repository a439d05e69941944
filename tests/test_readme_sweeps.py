"""The README's sweep commands, copied verbatim, run from a fresh working directory.

Each test adds only the suite's shared SHRINK list (steps, sizes, callback intervals): no hydra.* or
paths.* override a user would not type. Outputs must land under logs/train/ of that directory.
"""
from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import compare_rows, job_dirs, readme_command, run_as_typed, sweep_dir

pytestmark = pytest.mark.slow


def test_multirun_over_three_schedules(fresh_workdir):
    command = readme_command("python train.py -m schedule=linear,quadratic,cosine")
    run_as_typed(command, fresh_workdir)
    sweep = sweep_dir(fresh_workdir)
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2"]
    assert all((j / "checkpoints" / "last.ckpt").is_file() and (j / ".hydra" / "config.yaml").is_file() for j in jobs)
    argvs = [json.loads((j / "run_info.json").read_text())["argv"][1:] for j in jobs]
    assert argvs[0][:2] == ["-m", "schedule=linear,quadratic,cosine"] and argvs[1] == argvs[0] == argvs[2]
    rows = compare_rows(sweep, fresh_workdir)
    assert [r["schedule"] for r in rows] == ["linear", "quadratic", "cosine"]
    assert all(r["status"] == "ok" for r in rows)
    assert not (fresh_workdir / "logs" / "train" / "runs").exists()  # a sweep makes no single-run dirs


def test_schedule_sweep_preset_runs_six_jobs_each_with_fid(fresh_workdir):
    run_as_typed(readme_command("python train.py experiment=schedule_sweep"), fresh_workdir)
    sweep = sweep_dir(fresh_workdir)
    assert len(job_dirs(sweep)) == 6
    rows = compare_rows(sweep, fresh_workdir)
    assert {(r["schedule"], r["sampler"]) for r in rows} == {(s, p) for s in ("linear", "quadratic", "cosine")
                                                             for p in ("ddim", "ddpm")}
    assert all(float(r["val/fid_digits"]) > 0 for r in rows)


def test_schedule_sweep_with_two_joblib_workers(fresh_workdir):
    command = readme_command("python train.py experiment=schedule_sweep hydra/launcher=joblib hydra.launcher.n_jobs=2")
    result = run_as_typed(command, fresh_workdir)
    assert "Joblib" in result.stdout + result.stderr
    jobs = job_dirs(sweep_dir(fresh_workdir))
    assert len(jobs) == 6 and all((j / "checkpoints" / "last.ckpt").is_file() for j in jobs)


def test_a_sweep_of_ddp_jobs_runs_each_job_once_in_its_own_directory(fresh_workdir):
    """Lightning starts each DDP worker with the parent's command line: without care every worker would run
    the whole sweep again in a new directory."""
    run_as_typed(readme_command("python train.py -m trainer=ddp_cpu seed=1,2"), fresh_workdir)
    sweep = sweep_dir(fresh_workdir)  # asserts exactly one sweep directory
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    for job, seed in zip(jobs, (1, 2)):
        info = json.loads((job / "run_info.json").read_text())
        assert info["seed"] == seed and info["world_size"] == 2
        digests = info["replica_weight_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]
    assert not (fresh_workdir / "logs" / "train" / "runs").exists()


def test_optuna_search_as_written(fresh_workdir):
    run_as_typed(readme_command("python train.py hparams_search=digits_optuna"), fresh_workdir)
    sweep = sweep_dir(fresh_workdir)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"model.optimizer.lr", "callbacks.ema.decay", "model.min_snr_gamma"}
    assert results["best_value"] > 0  # the FID that the best trial's train.py returned
    assert len(job_dirs(sweep)) == 12  # n_trials of the preset


def test_quickstart_then_sampling_from_the_latest_link(fresh_workdir):
    """README command 1 after its install step: train (shrunk), then sample from logs/train/latest as written."""
    command = readme_command("pip install torch==2.14.1 torchvision==0.29.1 && pip install -e . && python train.py && "
                             "python sample.py ckpt=logs/train/latest/checkpoints/last.ckpt n=256 sampler=dpmpp_2m "
                             "metrics=[digits_classifier,fid_digits,kid_digits]")
    train, sample = command.split(" && ")[2:]
    run_as_typed(train, fresh_workdir)
    run_as_typed(sample, fresh_workdir, shrink=False)
    outputs = list((fresh_workdir / "logs" / "sample" / "runs").glob("*/metrics.json"))
    assert len(outputs) == 1
    summary = json.loads(outputs[0].read_text())
    metrics = summary["metrics"]
    assert metrics["fid_digits"]["n"] == 256 and sum(metrics["digits_classifier"]["class_counts"]) == 256
    assert summary["sampler"]["_target_"] == "diffexp.samplers.DPMSolver2M" and summary["nfe"] == 20


def test_formulation_sweep_and_its_comparison(fresh_workdir):
    """The design-space sweep as written: one job per formulation, each with its own path and objective; then the
    comparison script on it (with a small N and NFE grid) writes the table and plot."""
    import subprocess
    import sys

    from tests.conftest import ROOT, user_env

    run_as_typed(readme_command("python train.py -m formulation=ddpm,edm,flow,vp"), fresh_workdir)
    sweep = sweep_dir(fresh_workdir)
    jobs = job_dirs(sweep)
    paths = [yaml.safe_load((j / ".hydra" / "config.yaml").read_text())["path"]["_target_"] for j in jobs]
    assert paths == ["diffexp.paths.DiscretePath", "diffexp.paths.EDMPath", "diffexp.paths.FlowPath",
                     "diffexp.paths.CosinePath"]
    out = fresh_workdir / "cmp"
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "scripts" / "compare_formulations.py"),
                             "--sweep", str(sweep), "--n", "8", "--nfe", "2", "3", "--reference-steps", "4",
                             "--out", str(out)], cwd=fresh_workdir, env=user_env(fresh_workdir), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "formulations.md").read_text()
    assert all(f"| {name} |" in table for name in ("ddpm", "edm", "flow", "vp")) and "converged ODE" in table
    assert (out / "formulations.png").is_file() and (out / "flow.json").is_file()


def test_single_formulation_commands_as_typed(fresh_workdir):
    """The quickstart with another formulation: a command-line formulation= wins over the quickstart's own (flow)."""
    for command in ("python train.py formulation=ddpm", "python train.py formulation=edm sampler.S_churn=40"):
        run_as_typed(readme_command(command), fresh_workdir)
    runs = sorted((fresh_workdir / "logs" / "train" / "runs").iterdir())
    configs = [yaml.safe_load((r / ".hydra" / "config.yaml").read_text()) for r in runs]
    assert [(c["model"]["prediction_type"], c["path"]["_target_"]) for c in configs] == [
        ("epsilon", "diffexp.paths.DiscretePath"), ("edm", "diffexp.paths.EDMPath")]
    assert configs[0]["model"]["min_snr_gamma"] == 5.0 and configs[1]["sampler"]["S_churn"] == 40
    assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)
