"""SLURM sweeps: hydra-submitit-launcher's launcher, made safe to use on a real cluster.

``conf/hydra/launcher/slurm.yaml`` targets ``hydra_plugins.diffexp_slurm.launcher.SlurmLauncher`` (Hydra
loads launchers only from the ``hydra_plugins`` namespace), which adds, with the helpers below:

- **resources that follow the job config**: ``nodes`` = ``trainer.num_nodes``; ``tasks_per_node`` =
  ``trainer.devices`` (one process per device; with ``devices: -1`` the GPUs per node);
  ``gpus_per_node`` = ``tasks_per_node`` on a GPU trainer; ``cpus_per_task`` = ``data.num_workers`` + 1.
  Any of them set explicitly (``hydra.launcher.X=...``) wins.
- **a pre-flight check** against the partition (``sinfo``): a request no node can ever satisfy (CPUs,
  memory, GPUs, nodes, time) fails before submitting, naming the option, instead of pending forever;
- **a job watcher that needs no accounting database**: submitit polls ``sacct``, which fails on clusters
  without accounting, so a job that SLURM kills (time limit, ``scancel``, node failure) left the sweep
  waiting forever. :class:`SqueueWatcher` reads ``squeue`` (and ``sacct`` only where it works), fails a job
  with its state, and cancels a job pending for a reason that cannot clear (e.g. ``PartitionTimeLimit``).
- **one run directory per job**: only task 0 of a multi-task job writes the job's ``.hydra/`` files.
"""
from __future__ import annotations

import getpass
import re
import subprocess
import time

from hydra.errors import CompactHydraException
from omegaconf import DictConfig
from submitit.core import logger as submitit_logging
from submitit.slurm.slurm import SlurmInfoWatcher

class LaunchError(CompactHydraException):
    """A sweep that cannot be launched or whose jobs ended without a result: Hydra prints just the message
    (no traceback) and exits 1."""


class SlurmRequestError(LaunchError, ValueError):
    """A SLURM request that is invalid or that the cluster can never satisfy; nothing was submitted."""


class SlurmJobError(LaunchError, RuntimeError):
    """A submitted SLURM job ended without a result (killed, cancelled, timed out, refused by sbatch)."""


# pending reasons that no amount of waiting clears (squeue's %r); the job is cancelled with the reason
HOPELESS_PENDING = ("PartitionTimeLimit", "PartitionNodeLimit", "PartitionConfig", "BadConstraints",
                    "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob",
                    "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit", "AssocMaxWallDurationPerJobLimit")
GPU_ACCELERATORS = ("gpu", "cuda")


def run_command(args: list[str]) -> str:
    """stdout of a SLURM client command; a clear error if SLURM's commands are not installed."""
    try:
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout
    except FileNotFoundError:
        raise SlurmRequestError(f"`{args[0]}` not found: hydra/launcher=slurm submits from a machine with SLURM's "
                                f"client commands (sbatch, squeue, sinfo) on PATH") from None
    except subprocess.CalledProcessError as e:
        raise SlurmRequestError(f"`{' '.join(args)}` failed: {e.stderr.strip()}") from None


def parse_minutes(limit: str) -> float:
    """A SLURM time limit (``infinite``, ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return float("inf")
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        hours, minutes, seconds = parts
    else:  # MM, MM:SS
        hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def parse_gpus(gres: str) -> int:
    """GPUs per node in a ``sinfo %G`` field, e.g. ``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)`` -> 0."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))


def partition_nodes(partition: str | None) -> tuple[str, list[dict]]:
    """(partition name, one dict per node: cpus, memory_mb, gpus, time_min, state) from ``sinfo``.
    ``partition=None`` is the cluster's default partition."""
    lines = run_command(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G|%l|%t"]).strip().splitlines()
    rows = [line.split("|") for line in lines if line.count("|") == 6]
    names = sorted({r[0].rstrip("*") for r in rows})
    if partition is None:
        defaults = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        if not defaults:
            raise SlurmRequestError(f"this cluster has no default partition; set hydra.launcher.partition to one of "
                                    f"{names}")
        partition = defaults[0]
    nodes = [{"name": r[1], "cpus": int(r[2].rstrip("+")), "memory_mb": int(r[3].rstrip("+")),
              "gpus": parse_gpus(r[4]), "time_min": parse_minutes(r[5]), "state": r[6]}
             for r in rows if r[0].rstrip("*") == partition]
    if not nodes:
        raise SlurmRequestError(f"hydra.launcher.partition={partition!r} does not exist on this cluster; "
                                f"partitions: {names}")
    return partition, nodes


def check_request(params: dict, partition: str, nodes: list[dict]) -> None:
    """Raise SlurmRequestError (a ValueError) if the request is malformed or no ``params["nodes"]`` nodes of
    ``partition`` can hold one job of it."""
    for key, least in (("timeout_min", 1), ("nodes", 1), ("tasks_per_node", 1), ("cpus_per_task", 1),
                       ("gpus_per_node", 0), ("mem_gb", 1)):
        value = params.get(key)
        if (value is not None or key in ("timeout_min", "nodes", "tasks_per_node")) and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise SlurmRequestError(f"hydra.launcher.{key}={value!r}: must be a whole number >= {least}"
                                    + (" (null: the partition's default)" if key == "mem_gb" else ""))
    tasks, cpus = int(params["tasks_per_node"]), int(params.get("cpus_per_task") or 1)
    needs = {"CPUs": (tasks * cpus, "cpus",
                      f"hydra.launcher.cpus_per_task={cpus} x hydra.launcher.tasks_per_node={tasks}"),
             "MB of memory": ((params.get("mem_gb") or 0) * 1024, "memory_mb",
                              f"hydra.launcher.mem_gb={params.get('mem_gb')}"),
             "GPUs": (params.get("gpus_per_node") or 0, "gpus",
                      f"hydra.launcher.gpus_per_node={params.get('gpus_per_node')}")}
    fits = [n for n in nodes if all(n[key] >= need for need, key, _ in needs.values())]
    if len(fits) < int(params["nodes"]):
        largest = {label: max(n[key] for n in nodes) for label, (_, key, _) in needs.items()}
        for label, (need, key, option) in needs.items():
            if need > largest[label]:
                raise SlurmRequestError(f"{option} asks for {need} {label} per node, but the nodes of partition "
                                        f"{partition!r} have at most {largest[label]}; lower it (or pick another "
                                        f"hydra.launcher.partition). SLURM would reject the job or leave it pending "
                                        f"forever.")
        raise SlurmRequestError(f"hydra.launcher.nodes={params['nodes']} (trainer.num_nodes) nodes are needed but "
                                f"partition {partition!r} has only {len(fits)} that fit the request "
                                f"({len(nodes)} in all)")
    limit = min(n["time_min"] for n in fits)
    if params["timeout_min"] > limit:
        raise SlurmRequestError(f"hydra.launcher.timeout_min={params['timeout_min']} exceeds the time limit of "
                                f"partition {partition!r} ({limit:g} min); lower it")


def job_resources(cfg: DictConfig, params: dict, partition_gpus: int) -> dict:
    """nodes, tasks_per_node, gpus_per_node and cpus_per_task for one job: explicit ``params`` win, null ones
    follow the job's trainer and data config (see the module docstring)."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    gpu = accelerator in GPU_ACCELERATORS
    out = {"nodes": params.get("nodes") or int(trainer.get("num_nodes") or 1)}
    tasks = params.get("tasks_per_node")
    if tasks is None:
        devices = trainer.get("devices", 1)
        if isinstance(devices, int) and devices > 0:
            tasks = devices
        elif str(devices) in ("-1", "auto") and gpu:
            tasks = params.get("gpus_per_node") or partition_gpus
            if not tasks:
                raise SlurmRequestError(f"trainer.devices={devices} means all GPUs of a node, but partition nodes "
                                        f"report no GPUs; set hydra.launcher.gpus_per_node (and trainer.devices)")
        else:
            raise SlurmRequestError(f"cannot derive hydra.launcher.tasks_per_node from trainer.devices={devices!r}; "
                                    f"set trainer.devices to a number of devices per node or "
                                    f"hydra.launcher.tasks_per_node")
    out["tasks_per_node"] = int(tasks)
    out["gpus_per_node"] = params.get("gpus_per_node")
    if out["gpus_per_node"] is None and gpu:
        out["gpus_per_node"] = out["tasks_per_node"]
    cpus = params.get("cpus_per_task")
    if cpus is None:
        data = cfg.get("data") or {}
        cpus = int(data.get("num_workers") or 0) + 1
    out["cpus_per_task"] = int(cpus)
    return out


def job_error(error: BaseException, params: dict, sweep_dir, watcher: SqueueWatcher,
              failed: str | None = None) -> SlurmJobError:
    """The error that ends a sweep whose SLURM job (``failed``, else read from submitit's message) ended without
    a result: what happened, which of the sweep's other jobs were cancelled, where the logs are, then submitit's
    own account."""
    match = re.search(r"Job (\S+) \(task", str(error))
    cancelled = watcher.cancel_unfinished(failed or (match.group(1) if match else None))
    timed_out = "timed-out" in str(error) or "TIMEOUT" in str(error)
    return SlurmJobError(
        "a SLURM job of this sweep ended without a result"
        + (f": it reached its time limit (hydra.launcher.timeout_min={params['timeout_min']})" if timed_out else "")
        + (f". Cancelled the sweep's other unfinished jobs: {', '.join(cancelled)}" if cancelled else "")
        + f". Job logs: {sweep_dir}/.submitit/\n{type(error).__name__}: {error}")


def plan_request(params: dict, job_configs: list[DictConfig], partition: str, nodes: list[dict]) -> dict:
    """The launcher parameters for these jobs: resources derived per job (all jobs must agree, since they are
    submitted as one array), checked against the partition; ``signal_delay_s`` (submitit's warning signal
    before the time limit) 0 unless the job may be requeued, and then within half the time limit."""
    partition_gpus = max(n["gpus"] for n in nodes)
    resources = None
    for cfg in job_configs:
        job = job_resources(cfg, params, partition_gpus)
        if resources not in (None, job):
            raise SlurmRequestError(f"the jobs of this sweep need different SLURM resources ({resources} vs {job}); "
                                    f"sweep trainer.devices/num_nodes in separate runs or set hydra.launcher."
                                    f"tasks_per_node/nodes/gpus_per_node/cpus_per_task explicitly")
        resources = job
    planned = {**params, **resources}
    check_request(planned, partition, nodes)
    # submitit's warning signal (signal_delay_s before the limit, and SLURM may send it up to 60 s earlier) only
    # serves a requeue; without one (max_num_timeout=0) it would end a short job early: ask for it at the limit
    requeues = int(params.get("max_num_timeout") or 0) > 0
    delay = min(int(params.get("signal_delay_s") or 0), planned["timeout_min"] * 30)
    planned["signal_delay_s"] = delay if requeues else 0
    accelerator = str((job_configs[0].get("trainer") or {}).get("accelerator", "auto"))
    if partition_gpus and planned.get("gpus_per_node") is None and accelerator not in GPU_ACCELERATORS:
        submitit_logging.get_logger().warning(
            f"partition {partition!r} has GPUs but trainer.accelerator={accelerator} requests none: the jobs train on "
            f"CPUs; use trainer=gpu or trainer=ddp (or set hydra.launcher.gpus_per_node)")
    return planned


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, reading ``squeue`` (works without accounting) and ``sacct`` only for jobs
    squeue no longer lists, where accounting exists. A job gone from both counts as finished: submitit
    then finds its result file or raises with the job's log. A job pending for a reason in
    ``HOPELESS_PENDING`` is cancelled, its state reported as ``CANCELLED (pending: REASON)``."""

    def __init__(self, delay_s: int = 30) -> None:
        super().__init__(delay_s=delay_s)
        self._registered_at: dict[str, float] = {}
        self._seen: set[str] = set()
        self._cancelled: dict[str, str] = {}

    def register_job(self, job_id: str) -> None:
        super().register_job(job_id)
        self._registered_at.setdefault(job_id, time.time())

    def _squeue(self) -> dict[str, dict[str, str]]:
        out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%N|%r"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        info = {}
        for line in out.stdout.splitlines():
            job_id, state, nodes, reason = (line.split("|") + ["", "", ""])[:4]
            info[job_id.strip()] = {"JobID": job_id.strip(), "State": state, "NodeList": nodes, "Reason": reason}
        return info

    def _sacct(self, job_ids: set[str]) -> dict[str, dict[str, str]]:
        command = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"]
        for job_id in {j.split("_")[0] for j in job_ids}:
            command += ["-j", job_id]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):  # no sacct on this machine, or a slow database
            return {}
        return self.read_info(out.stdout) if out.returncode == 0 else {}

    def cancel_unfinished(self, failed: str | None = None) -> list[str]:
        """``scancel`` every job of this process still queued or running but ``failed`` (and array parents,
        whose tasks are listed themselves); returns their ids."""
        self.update()
        active = self._registered - self._finished - {failed}
        unfinished = sorted(j for j in active if not any(k.startswith(f"{j}_") for k in self._registered))
        if unfinished:
            subprocess.run(["scancel", *unfinished], capture_output=True, timeout=60)
        return unfinished

    def update(self) -> None:
        active = self._registered - self._finished
        if not active:
            return
        self._num_calls += 1
        try:
            queue = self._squeue()
        except Exception as e:  # a transient controller hiccup: keep the last known states
            submitit_logging.get_logger().warning(f"squeue failed ({e}); job states may be stale")
            self._last_status_check = time.time()
            return
        missing = {j for j in active if j not in queue}
        accounted = self._sacct(missing) if missing else {}
        for job_id in active:
            info = queue.get(job_id) or accounted.get(job_id)
            if info is None:  # neither squeue nor sacct knows it: finished and purged (or not yet listed)
                age = time.time() - self._registered_at.get(job_id, 0.0)
                gone = job_id in self._seen or age > 10
                info = {"JobID": job_id, "State": "FINISHED_AND_PURGED" if gone else "PENDING"}
            else:
                self._seen.add(job_id)
                if info.get("State") == "PENDING" and info.get("Reason", "").startswith(HOPELESS_PENDING):
                    subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
                    self._cancelled[job_id] = info["Reason"]
            if job_id in self._cancelled:
                info = {**info, "State": f"CANCELLED (pending: {self._cancelled[job_id]})"}
            self._info_dict[job_id] = info
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)
        self._last_status_check = time.time()
