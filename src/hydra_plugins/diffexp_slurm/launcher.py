"""diffexp's SLURM launcher (``hydra/launcher=slurm``); the helpers and the why are in :mod:`diffexp.slurm`."""
from __future__ import annotations

from typing import Sequence

import submitit
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from submitit.slurm.slurm import SlurmJob

from diffexp.slurm import SqueueWatcher, check_request, job_resources, partition_nodes


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher with derived resources, a pre-flight check, a watcher that
    works without accounting, and one writer of each job directory (see the module docstring)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        assert self.config is not None and self.hydra_context is not None
        partition, nodes = partition_nodes(self.params.get("partition"))
        partition_gpus = max(n["gpus"] for n in nodes)
        resources = None
        for overrides in job_overrides:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            job = job_resources(cfg, self.params, partition_gpus)
            if resources not in (None, job):
                raise ValueError(f"the jobs of this sweep need different SLURM resources ({resources} vs {job} for "
                                 f"{' '.join(overrides)}); sweep trainer.devices/num_nodes in separate runs or set "
                                 f"hydra.launcher.tasks_per_node/nodes/gpus_per_node/cpus_per_task explicitly")
            resources = job
        params = {**self.params, **resources}
        check_request(params, partition, nodes)
        SlurmJob.watcher = SqueueWatcher()  # class attribute: every SLURM job of this process uses it
        saved, self.params = self.params, params
        try:
            return super().launch(job_overrides, initial_job_idx)
        except submitit.core.utils.UncompletedJobError as e:
            raise RuntimeError(f"a SLURM job of this sweep ended without a result; {e}") from None
        finally:
            self.params = saved

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state):
        """Run one task of a job on the cluster; tasks other than 0 do not write the job's .hydra/ files."""
        if submitit.JobEnvironment().global_rank > 0:
            sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null"]
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
