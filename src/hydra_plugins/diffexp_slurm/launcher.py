"""diffexp's SLURM launcher (``hydra/launcher=slurm``); the helpers and the why are in :mod:`diffexp.slurm`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import submitit
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from submitit.slurm.slurm import SlurmJob

from diffexp.slurm import SlurmJobError, SlurmRequestError, SqueueWatcher, job_error, partition_nodes, plan_request


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with derived resources, a pre-flight check, a watcher that
    works without accounting, and one writer of each job directory (see the module docstring)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            partition, nodes = partition_nodes(self.params.get("partition"))
            configs = [self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                       for overrides in job_overrides]
            params = plan_request(self.params, configs, partition, nodes)
        except SlurmRequestError:
            if sweep_dir.is_dir() and [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
                shutil.rmtree(sweep_dir)  # only Hydra's copy of the config was written: leave no empty sweep
            raise
        watcher = SlurmJob.watcher = SqueueWatcher()  # class attribute: every SLURM job of this process uses it
        saved, self.params = self.params, params
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        except submitit.core.utils.FailedSubmissionError as e:
            raise SlurmJobError(f"sbatch refused the job: {e}") from None
        except submitit.core.utils.UncompletedJobError as e:  # killed, cancelled, node failure
            raise job_error(e, params, sweep_dir, watcher) from None
        finally:
            self.params = saved
        for job in returns:  # a job stopped by submitit's own time-limit signal
            if job.status == JobStatus.FAILED and type(job._return_value).__module__.startswith("submitit"):
                raise job_error(job._return_value, params, sweep_dir, watcher, failed=str(OmegaConf.select(job.hydra_cfg, "hydra.job.id")))
        return returns

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state):
        """Run one task of a job on the cluster; tasks other than 0 do not write the job's .hydra/ files."""
        if submitit.JobEnvironment().global_rank > 0:
            sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null"]
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
