"""Which process of a distributed job this is, read from the launcher's environment before Hydra starts.

A multi-node job starts ``python train.py ...`` once per node (torchrun, ``srun``, or by hand with
``NODE_RANK``/``MASTER_ADDR``/``WORLD_SIZE``), and each start would make its own timestamped run directory.
Only the first process (global rank 0) should: :func:`secondary_process_overrides` sends the Hydra
output of every other process to a throwaway directory, and :func:`set_rank_for_logging` makes Lightning's
rank-zero logging know the rank before the Trainer exists. Lightning's own DDP children are left alone:
Lightning passes them ``hydra.run.dir`` of their parent.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile

NODE_VARIABLES = ("NODE_RANK", "GROUP_RANK")  # node index set by hand / torchrun


def env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def launched_rank() -> tuple[bool, int | None]:
    """(is this a process other than global rank 0 of a distributed launch, its global rank if known).

    ``RANK`` (torchrun, Lightning) or ``SLURM_PROCID`` of a multi-task ``srun`` give the rank; otherwise a
    ``NODE_RANK``/``GROUP_RANK`` or ``LOCAL_RANK`` above 0 says "not rank 0" without the exact number."""
    rank = env_int("RANK")
    if rank is None and (env_int("SLURM_NTASKS") or 1) > 1:
        rank = env_int("SLURM_PROCID")
    if rank is not None:
        return rank > 0, rank
    others = [env_int(n) or 0 for n in (*NODE_VARIABLES, "LOCAL_RANK")]
    return any(v > 0 for v in others), None


def secondary_process_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that keep a non-zero rank from creating a run (or sweep) directory: its outputs go to a
    temporary directory removed at exit. Empty for rank 0, outside distributed launches, and where the command
    line already names ``hydra.run.dir`` (Lightning's DDP children, a user's choice)."""
    secondary, rank = launched_rank()
    if not secondary or any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in argv):
        return []
    scratch = tempfile.mkdtemp(prefix=f"diffexp-rank{'' if rank is None else rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]


def set_rank_for_logging(devices_per_node=None) -> None:
    """Tell Lightning's rank-zero logging this process's rank when only ``NODE_RANK`` (``GROUP_RANK``) and
    ``LOCAL_RANK`` give it: node_rank x devices_per_node + local_rank, or just "not 0" if the devices per
    node are not a number.

    Lightning reads ``RANK``/``LOCAL_RANK``/``SLURM_PROCID`` at import and learns the real rank only when the
    Trainer is built, so a second node started with ``NODE_RANK=1 LOCAL_RANK=0`` logged as rank 0 until then."""
    secondary, rank = launched_rank()
    if not secondary or rank is not None:
        return
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    node = max(env_int(n) or 0 for n in NODE_VARIABLES)
    local = env_int("LOCAL_RANK") or 0
    exact = node * devices_per_node + local if isinstance(devices_per_node, int) and devices_per_node > 0 else None
    rank_zero_only.rank = exact if exact is not None else max(rank_zero_only.rank, 1)


def prepare_ddp_children(trainer) -> None:
    """Make the DDP worker processes Lightning is about to start run this job, in this job's directory.

    Lightning starts each worker as ``python train.py <this process's argv> hydra.run.dir=<HydraConfig
    run.dir>``. In a sweep that argv is the whole sweep (``-m schedule=linear,cosine``) and ``run.dir`` a fresh
    timestamp, so every worker would start the sweep again in a new directory. Here the argv becomes this
    job's own overrides in RUN mode and ``run.dir`` this job's output directory (both restored after the job
    by :func:`launch_environment_restored`). A joblib worker cannot be re-run that way: refused."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from omegaconf import read_write

    launcher = getattr(trainer.strategy, "launcher", None)
    spawns = (isinstance(launcher, _SubprocessScriptLauncher)
              and not launcher.cluster_environment.creates_processes_externally)
    if not spawns or not HydraConfig.initialized():
        return
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if main_spec is not None and main_spec.name.startswith(("loky", "joblib")):
        raise ValueError(f"trainer.strategy={type(trainer.strategy).__name__} starts its worker processes by "
                         f"re-running the command line, which a joblib worker does not have: run DDP jobs with the "
                         f"default launcher (one job after another) or hydra/launcher=slurm")
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def threads_for_this_task() -> None:
    """Use the CPUs SLURM gave this task (``SLURM_CPUS_PER_TASK``) for torch's intra-op threads, unless
    ``OMP_NUM_THREADS`` says otherwise: torch would otherwise start a thread per core of the node and
    tasks sharing a node would slow each other down."""
    cpus = env_int("SLURM_CPUS_PER_TASK")
    if cpus and cpus > 0 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(cpus)


LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def launch_environment_restored():
    """Undo what a job changes in this process's launch state: the launch variables and ``sys.argv``.

    Lightning's DDP launcher sets ``LOCAL_RANK`` and friends in the parent; the next job of a sweep in the
    same process would then believe its processes were started externally and wait forever for the ranks it
    never launched. :func:`prepare_ddp_children` rewrites ``sys.argv`` for one job only."""
    saved = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    argv = list(sys.argv)
    try:
        yield
    finally:
        sys.argv[:] = argv
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
