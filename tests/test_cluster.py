"""Sweeps on a real SLURM cluster and multi-node DDP on localhost.

The SLURM tests start a one-node cluster with experiments/cluster/slurm_local.sh (root needed). Under
CI=true a missing prerequisite is installed (Debian's packages) or the test fails; elsewhere they skip
and say how to run them, as root: `experiments/cluster/slurm_local.sh install`, then
`DIFFEXP_TEST_SLURM=1 python -m pytest -m slow tests/test_cluster.py`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHRINK, compare_rows, readme_command, run_as_typed, sweep_dir, user_env

SCRIPT = ROOT / "experiments" / "cluster" / "slurm_local.sh"
IN_CI = os.environ.get("CI") == "true"
# one local cluster per module: its tests stay on one pytest-xdist worker
SLURM_GROUP = pytest.mark.xdist_group("slurm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(reason: str):
    """Fail under CI (a prerequisite CI must provide), skip with instructions elsewhere."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(f"{reason}. To run, as root: `{SCRIPT.relative_to(ROOT)} install`, then "
                f"`DIFFEXP_TEST_SLURM=1 python -m pytest -m slow tests/test_cluster.py` (CI=true does this itself)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node SLURM cluster; yields the environment its client commands need."""
    if not (IN_CI or os.environ.get("DIFFEXP_TEST_SLURM") == "1"):
        missing("the SLURM tests start a local cluster as root; they run under CI=true or DIFFEXP_TEST_SLURM=1")
    if os.geteuid() != 0:
        missing("the SLURM tests need root (slurmd starts jobs as their user)")
    if not IN_CI and not shutil.which("slurmctld"):
        missing("SLURM is not installed")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_CTLD_PORT": str(free_port()),
           "SLURM_LOCAL_SLURMD_PORT": str(free_port())}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}")
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


def slurm_env(workdir: Path, slurm: dict) -> dict:
    return user_env(workdir, **slurm)


def squeue(slurm: dict) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env={**os.environ, **slurm}, capture_output=True,
                         text=True, check=True)
    return out.stdout.splitlines()


def job_ids(slurm: dict) -> set[str]:
    return {line.split()[0] for line in squeue(slurm)}


@SLURM_GROUP
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_slurm_sweep_of_two_schedules(slurm, fresh_workdir):
    command = readme_command("python train.py -m hydra/launcher=slurm schedule=linear,cosine")
    run_as_typed(command, fresh_workdir, env=slurm_env(fresh_workdir, slurm))
    sweep = sweep_dir(fresh_workdir)
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert f"schedule={schedule}" in overrides
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # each SLURM job's log
    rows = compare_rows(sweep, fresh_workdir)
    assert [r["schedule"] for r in rows] == ["linear", "cosine"] and all(r["status"] == "ok" for r in rows)


@SLURM_GROUP
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_slurm_ddp_job_of_two_tasks(slurm, fresh_workdir):
    command = readme_command("python train.py -m hydra/launcher=slurm trainer=ddp_cpu")
    run_as_typed(command, fresh_workdir, env=slurm_env(fresh_workdir, slurm))
    sweep = sweep_dir(fresh_workdir)
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    info = json.loads((sweep / "0" / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert len(info["replica_weight_digests"]) == 2 and len(set(info["replica_weight_digests"])) == 1
    assert [p.name for p in (sweep / "0" / "checkpoints").glob("*.ckpt")].count("last.ckpt") == 1
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one SLURM job, two tasks
    assert "global_rank=1(2)" in logs[1].read_text()


@SLURM_GROUP
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_request_the_cluster_cannot_satisfy_fails_before_submitting(slurm, fresh_workdir):
    args = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=512", *SHRINK]
    before = job_ids(slurm)
    started = time.monotonic()
    result = subprocess.run(args, cwd=fresh_workdir, env=slurm_env(fresh_workdir, slurm), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode != 0
    assert "hydra.launcher.cpus_per_task=512 x hydra.launcher.tasks_per_node=1 asks for 512 CPUs" in result.stderr
    assert "partition 'debug'" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120  # (the other xdist worker shares the CPUs)
    assert job_ids(slurm) <= before  # nothing was submitted
    assert not (fresh_workdir / "logs" / "train" / "multiruns").exists() or not any(
        (fresh_workdir / "logs" / "train" / "multiruns").iterdir())  # and no empty sweep directory is left


LONG_RUN = ["trainer.max_steps=1000000", "trainer.val_check_interval=1000000",
            "callbacks.model_checkpoint.every_n_train_steps=1000000", "callbacks.sample_grid.every_n_steps=1000000",
            "callbacks.denoising_grid.every_n_steps=1000000"]


@SLURM_GROUP
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_killed_by_slurm_ends_the_sweep_and_cancels_the_rest(slurm, fresh_workdir):
    """No accounting on this cluster (sacct fails), as on many small clusters: submitit alone would wait forever,
    and the sweep's other job would run on with nobody waiting for it."""
    args = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "schedule=linear,cosine", *SHRINK, *LONG_RUN]
    before = job_ids(slurm)
    sweep = subprocess.Popen(args, cwd=fresh_workdir, env=slurm_env(fresh_workdir, slurm), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(running := sorted(line.split()[0] for line in squeue(slurm)
                                    if line.endswith("RUNNING") and line.split()[0] not in before)) < 2:
            assert time.monotonic() < deadline and sweep.poll() is None, "the jobs never started"
            time.sleep(1)
        subprocess.run(["scancel", running[0]], env={**os.environ, **slurm}, check=True)
        cancelled = time.monotonic()
        _, stderr = sweep.communicate(timeout=240)
        waited = time.monotonic() - cancelled
        time.sleep(2)
        left = job_ids(slurm) - before
    finally:
        sweep.kill()
        leftovers = job_ids(slurm) - before
        if leftovers:
            subprocess.run(["scancel", *leftovers], env={**os.environ, **slurm})
    assert sweep.returncode != 0 and waited < 120
    assert "a SLURM job of this sweep ended without a result" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "CANCELLED" in stderr and f"Cancelled the sweep's other unfinished jobs: {running[1]}" in stderr
    assert all(line.split()[1] in ("CANCELLED", "COMPLETING") for line in squeue(slurm) if line.split()[0] in left)


@SLURM_GROUP
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_past_its_time_limit_ends_the_sweep_with_a_clear_error(slurm, fresh_workdir):
    """The job runs to its limit (submitit's early warning signal only serves requeues), SLURM kills it, and the
    sweep says it ran out of time instead of waiting forever (no accounting here) or taking it for a NaN job."""
    args = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=1", *SHRINK,
            *LONG_RUN]
    before = job_ids(slurm)
    started = time.monotonic()
    try:
        result = subprocess.run(args, cwd=fresh_workdir, env=slurm_env(fresh_workdir, slurm), capture_output=True,
                                text=True, timeout=300)
    finally:
        leftovers = job_ids(slurm) - before
        if leftovers:
            subprocess.run(["scancel", *leftovers], env={**os.environ, **slurm})
    assert result.returncode != 0
    assert "it reached its time limit (hydra.launcher.timeout_min=1)" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started > 55  # it ran to its limit: no early warning signal ended it at the start


def multinode_command(kind: str, node: int, port: int) -> tuple[list[str], dict]:
    """(argv, extra env) that start node ``node`` of a 2-node x 1-process job on localhost."""
    args = ["trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", *SHRINK]
    if kind == "torchrun":
        return ([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                 f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", "train.py", *args], {})
    return ([sys.executable, "train.py", *args],
            {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": str(node)})


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["torchrun", "environment"])
def test_two_nodes_on_localhost_form_one_world_with_one_run_directory(kind, fresh_workdir, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        args, extra = multinode_command(kind, node, port)
        env = user_env(fresh_workdir, **extra)
        for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
            if name not in extra:
                env.pop(name, None)
        procs.append(subprocess.Popen(args, cwd=fresh_workdir, env={**env, "TMPDIR": str(tmp_path)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:] + outputs[0][-3000:]
    runs = list((fresh_workdir / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 made no run directory of its own
    info = json.loads((runs[0] / "run_info.json").read_text())
    assert info["world_size"] == 2
    digests = info["replica_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    for rank_zero_line in ("Run directory", "effective batch size", "output dir", "GPU available", "seed 42"):
        assert rank_zero_line in outputs[0] and rank_zero_line not in outputs[1], rank_zero_line
    assert not list(tmp_path.glob("diffexp-rank*")), "rank 1's scratch directory was not removed"
