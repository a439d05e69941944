"""Fast checks of the sweep/cluster plumbing: SLURM resources and limits, the squeue watcher, rank detection."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from diffexp import slurm
from diffexp.distributed import launch_environment_restored, launched_rank, secondary_process_overrides
from tests.conftest import ROOT, readme_command

NODE = {"name": "n1", "cpus": 16, "memory_mb": 128_000, "gpus": 4, "time_min": 2880.0, "state": "idle"}


def compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


@pytest.mark.parametrize("text,minutes", [("infinite", float("inf")), ("30", 30), ("30:00", 30), ("2:00:00", 120),
                                          ("1-00:00:00", 1440), ("1-2", 1560), ("1-02:30", 1590), ("0:30", 0.5)])
def test_slurm_time_limits_are_read_as_sinfo_prints_them(text, minutes):
    assert slurm.parse_minutes(text) == minutes


@pytest.mark.parametrize("gres,gpus", [("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("(null)", 0), ("gpu:2,mps:100", 2)])
def test_gpus_per_node_from_gres(gres, gpus):
    assert slurm.parse_gpus(gres) == gpus


def test_resources_follow_the_trainer_unless_set():
    params = OmegaConf.to_container(compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher, resolve=True)
    cases = {  # overrides -> (nodes, tasks_per_node, gpus_per_node, cpus_per_task)
        (): (1, 1, None, 1),
        ("trainer=ddp_cpu",): (1, 2, None, 1),
        ("trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "data.num_workers=7"): (2, 4, 4, 8),
        ("trainer=ddp",): (1, 4, 4, 1),  # devices=-1: the partition's GPUs per node
        ("trainer=gpu",): (1, 1, 1, 1),
    }
    for overrides, expected in cases.items():
        cfg = compose_with_hydra(["hydra/launcher=slurm", *overrides])
        got = slurm.job_resources(cfg, params, partition_gpus=4)
        assert (got["nodes"], got["tasks_per_node"], got["gpus_per_node"], got["cpus_per_task"]) == expected, overrides
    explicit = {**params, "tasks_per_node": 3, "gpus_per_node": 8, "cpus_per_task": 5, "nodes": 2}
    got = slurm.job_resources(compose_with_hydra(["trainer=ddp_cpu"]), explicit, partition_gpus=0)
    assert (got["nodes"], got["tasks_per_node"], got["gpus_per_node"], got["cpus_per_task"]) == (2, 3, 8, 5)
    with pytest.raises(ValueError, match="hydra.launcher.gpus_per_node"):
        slurm.job_resources(compose_with_hydra(["trainer=ddp"]), params, partition_gpus=0)


def test_the_readme_gpu_example_composes_to_two_nodes_of_four_gpus():
    command = readme_command(
        "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.account=myproject "
        "hydra.launcher.timeout_min=720 hydra.launcher.mem_gb=256 'hydra.launcher.setup=[\"source .venv/bin/activate\"]' "
        "trainer=ddp trainer.devices=4 trainer.num_nodes=2 data.num_workers=7 schedule=linear,cosine")
    overrides = [a for a in shlex.split(command)[3:] if a != "schedule=linear,cosine"]
    cfg = compose_with_hydra(overrides)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["setup"] == ["source .venv/bin/activate"] and params["account"] == "myproject"
    got = slurm.job_resources(cfg, params, partition_gpus=4)
    request = {**params, **got}
    assert (got["nodes"], got["tasks_per_node"], got["gpus_per_node"], got["cpus_per_task"]) == (2, 4, 4, 8)
    gpu_node = {**NODE, "cpus": 64, "memory_mb": 512_000}
    slurm.check_request(request, "gpu", [gpu_node, {**gpu_node, "name": "n2"}])  # fits two such nodes
    with pytest.raises(ValueError, match="trainer.num_nodes"):
        slurm.check_request(request, "gpu", [gpu_node])


@pytest.mark.parametrize("change,match", [
    ({"cpus_per_task": 8, "tasks_per_node": 4}, r"hydra.launcher.cpus_per_task=8 x hydra.launcher.tasks_per_node=4 "
                                                r"asks for 32 CPUs per node, but the nodes of partition 'p' have at most 16"),
    ({"mem_gb": 500}, r"hydra.launcher.mem_gb=500 asks for 512000 MB of memory"),
    ({"gpus_per_node": 8}, r"hydra.launcher.gpus_per_node=8 asks for 8 GPUs"),
    ({"timeout_min": 5000}, r"hydra.launcher.timeout_min=5000 exceeds the time limit of partition 'p' \(2880 min\)"),
    ({"nodes": 3}, r"hydra.launcher.nodes=3"),
])
def test_requests_no_node_can_satisfy_are_refused_naming_the_option(change, match):
    ok = {"nodes": 1, "tasks_per_node": 4, "cpus_per_task": 4, "mem_gb": 64, "gpus_per_node": 4, "timeout_min": 60}
    slurm.check_request(ok, "p", [NODE])
    with pytest.raises(ValueError, match=match):
        slurm.check_request({**ok, **change}, "p", [NODE])


def test_partition_lookup_reads_sinfo_and_names_the_choices(monkeypatch):
    sinfo = "debug*|n1|2|21694|(null)|infinite|idle\ngpu|g1|64|512000|gpu:a100:8(S:0-1)|2-00:00:00|mix\n"
    monkeypatch.setattr(slurm, "run_command", lambda args: sinfo)
    assert slurm.partition_nodes(None) == ("debug", [{"name": "n1", "cpus": 2, "memory_mb": 21694, "gpus": 0,
                                                      "time_min": float("inf"), "state": "idle"}])
    assert slurm.partition_nodes("gpu")[1][0]["gpus"] == 8 and slurm.partition_nodes("gpu")[1][0]["time_min"] == 2880
    with pytest.raises(ValueError, match=r"hydra.launcher.partition='cpu' does not exist.*\['debug', 'gpu'\]"):
        slurm.partition_nodes("cpu")


def test_missing_slurm_commands_are_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(slurm.SlurmRequestError, match="`sinfo` not found: hydra/launcher=slurm"):
        slurm.partition_nodes(None)


def test_squeue_watcher_reports_killed_purged_and_hopeless_jobs(monkeypatch):
    """Without accounting, submitit would see every state as UNKNOWN and wait forever."""
    watcher = slurm.SqueueWatcher()
    queue = {"7_0": {"JobID": "7_0", "State": "TIMEOUT", "NodeList": "n1", "Reason": "TimeLimit"},
             "7_1": {"JobID": "7_1", "State": "RUNNING", "NodeList": "n1", "Reason": "None"},
             "8": {"JobID": "8", "State": "PENDING", "NodeList": "", "Reason": "PartitionTimeLimit"}}
    cancelled = []
    monkeypatch.setattr(watcher, "_squeue", lambda: queue)
    monkeypatch.setattr(watcher, "_sacct", lambda ids: {})  # no accounting database
    monkeypatch.setattr(slurm.subprocess, "run", lambda args, **kw: cancelled.append(args))
    for job_id in ("7_0", "7_1", "8", "9", "10"):
        watcher.register_job(job_id)
    watcher._registered_at["9"] -= 60  # submitted a minute ago, no longer listed anywhere
    watcher.update()
    assert watcher.get_state("10", mode="cache") == "PENDING"  # just submitted, not listed yet: keep waiting
    assert watcher.get_state("7_0", mode="cache") == "TIMEOUT" and watcher.is_done("7_0", mode="cache")
    assert not watcher.is_done("7_1", mode="cache")
    assert watcher.get_state("8", mode="cache") == "CANCELLED (pending: PartitionTimeLimit)"
    assert cancelled == [["scancel", "8"]] and watcher.is_done("8", mode="cache")
    assert watcher.is_done("9", mode="cache")  # gone: finished, so submitit looks for its result file
    # where accounting exists, a job gone from squeue gets its final state from sacct
    monkeypatch.setattr(watcher, "_sacct", lambda ids: {"10": {"JobID": "10", "State": "OUT_OF_MEMORY"}})
    queue.clear()
    watcher.update()
    assert watcher.get_state("10", mode="cache") == "OUT_OF_MEMORY" and watcher.is_done("10", mode="cache")
    assert watcher.get_state("7_1", mode="cache") == "FINISHED_AND_PURGED"


def test_a_failed_job_cancels_only_the_sweeps_other_unfinished_jobs(monkeypatch):
    watcher = slurm.SqueueWatcher()
    queue = {"3_0": {"JobID": "3_0", "State": "RUNNING", "Reason": "None"},  # the job that failed, still exiting
             "3_1": {"JobID": "3_1", "State": "RUNNING", "Reason": "None"},
             "3_2": {"JobID": "3_2", "State": "COMPLETED", "Reason": "None"}}
    cancelled = []
    monkeypatch.setattr(watcher, "_squeue", lambda: queue)
    monkeypatch.setattr(watcher, "_sacct", lambda ids: {})
    monkeypatch.setattr(slurm.subprocess, "run", lambda args, **kw: cancelled.append(args))
    for job_id in ("3", "3_0", "3_1", "3_2"):  # submitit registers the array too
        watcher.register_job(job_id)
    assert watcher.cancel_unfinished(failed="3_0") == ["3_1"] and cancelled == [["scancel", "3_1"]]
    error = slurm.job_error(RuntimeError("Job 3_0 (task: 0) ... timed-out too many times"), {"timeout_min": 1},
                            "logs/sweep", watcher)
    assert "it reached its time limit (hydra.launcher.timeout_min=1)" in str(error)
    assert "Cancelled the sweep's other unfinished jobs: 3_1" in str(error)


@pytest.mark.parametrize("env,secondary", [
    ({}, False),
    ({"RANK": "0", "LOCAL_RANK": "0"}, False),
    ({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, True),  # torchrun, second node
    ({"NODE_RANK": "1"}, True),  # by hand, second node
    ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, True),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, True),  # srun python train.py
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, False),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "1"}, False),  # one task: not a distributed launch
])
def test_only_rank_zero_keeps_its_hydra_run_directory(monkeypatch, env, secondary):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_rank()[0] is secondary
    overrides = secondary_process_overrides(["schedule=cosine"])
    assert bool(overrides) is secondary
    if secondary:
        scratch = overrides[0].split("=", 1)[1]
        assert os.path.isdir(scratch) and "hydra.output_subdir=null" in overrides
        # Lightning's own DDP workers come with their parent's run dir: left alone
        assert secondary_process_overrides(["hydra.run.dir=/some/run"]) == []


def test_launch_variables_and_argv_set_by_a_job_are_undone(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "schedule=linear,cosine"])
    with launch_environment_restored():
        os.environ["LOCAL_RANK"] = "0"
        os.environ["MASTER_PORT"] = "999"
        sys.argv = ["train.py", "schedule=linear", "hydra.mode=RUN"]
    assert "LOCAL_RANK" not in os.environ and os.environ["MASTER_PORT"] == "1234"
    assert sys.argv == ["train.py", "-m", "schedule=linear,cosine"]


def test_the_slurm_cluster_script_explains_itself():
    result = subprocess.run(["bash", str(ROOT / "experiments" / "cluster" / "slurm_local.sh")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "install|start|stop|status" in result.stderr


def test_sweep_and_run_directories_resolve_without_a_running_hydra():
    """The multirun parent resolves hydra.sweep.dir before any job exists (no HydraConfig yet): it must not
    depend on ${hydra:...}. Both stay under logs/train/ of the working directory."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_with_hydra([])
    saved, HydraConfig.instance().cfg = HydraConfig.instance().cfg, None
    try:
        assert OmegaConf.select(cfg, "hydra.sweep.dir").startswith("./logs/train/multiruns/")
        assert OmegaConf.select(cfg, "hydra.run.dir").startswith("./logs/train/runs/")
    finally:
        HydraConfig.instance().cfg = saved


def test_relative_paths_are_anchored_where_train_py_started(tmp_path, monkeypatch):
    """With hydra.job.chdir=true the job runs inside its run dir; logs/, data/ and the latest link must not
    follow it there, and the saved config says where they are."""
    from diffexp.course import compose
    from diffexp.train import anchor_paths

    monkeypatch.chdir(tmp_path)
    cfg = compose(["hydra.job.chdir=true"], tmp_path / "run")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")  # what Hydra does before the job starts
    anchor_paths(cfg)
    assert cfg.paths.root_dir == str(tmp_path)
    assert cfg.paths.latest_link == f"{tmp_path}/logs/train/latest" and cfg.paths.data_dir == f"{tmp_path}/data"


@pytest.mark.parametrize("change,match", [
    ({"timeout_min": 0}, r"hydra.launcher.timeout_min=0: must be a whole number >= 1"),
    ({"timeout_min": -5}, r"hydra.launcher.timeout_min=-5"),
    ({"cpus_per_task": 0}, r"hydra.launcher.cpus_per_task=0"),
    ({"mem_gb": 0}, r"hydra.launcher.mem_gb=0: must be a whole number >= 1 \(null: the partition's default\)"),
    ({"tasks_per_node": "two"}, r"hydra.launcher.tasks_per_node='two'"),
])
def test_malformed_requests_are_refused_before_anything_is_submitted(change, match):
    ok = {"nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": None, "gpus_per_node": None,
          "timeout_min": 60}
    with pytest.raises(slurm.SlurmRequestError, match=match):
        slurm.check_request({**ok, **change}, "p", [NODE])


def test_the_warning_signal_comes_within_the_time_limit():
    """submitit asks SLURM for a signal signal_delay_s before the limit (default 120 s; SLURM may send it up to
    60 s earlier). With a 1-minute limit it came at once and ended the job at its start; it only serves a
    requeue, so without one (max_num_timeout=0) it is asked for at the limit."""
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.timeout_min=1"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["signal_delay_s"] == 120 and params["max_num_timeout"] == 0
    assert slurm.plan_request(params, [cfg], "p", [NODE])["signal_delay_s"] == 0
    params["max_num_timeout"] = 3
    assert slurm.plan_request(params, [cfg], "p", [NODE])["signal_delay_s"] == 30
    params["timeout_min"] = 600
    assert slurm.plan_request(params, [cfg], "p", [NODE])["signal_delay_s"] == 120
