"""Logger set-up that needs more than a YAML: W&B offline fallback, the full config logged everywhere."""
from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict


def wandb_logged_in() -> bool:
    """True when W&B has credentials: WANDB_API_KEY or an api.wandb.ai entry in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and any("wandb" in host for host in netrc.netrc(path).hosts)
    except (netrc.NetrcParseError, OSError):
        return False


def sweep_job() -> dict | None:
    """For a job of a Hydra multirun: {group: the sweep directory's name, job_num, overrides}; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {"group": Path(hc.sweep.dir).name, "job_num": hc.job.num, "overrides": list(hc.overrides.task)}


def prepare_logger_configs(cfg: DictConfig) -> list[str]:
    """Adjust logger configs in place before instantiation; return messages for the user.

    W&B: offline unless logged in or WANDB_MODE says otherwise; the run is named after the run dir;
    in a multirun every job joins the group named after the sweep directory, tagged with its overrides.
    """
    messages = []
    sweep = sweep_job()
    loggers = cfg.get("logger") or {}
    for key, logger_cfg in loggers.items():
        if not isinstance(logger_cfg, DictConfig) or not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
            continue
        with open_dict(logger_cfg):
            if logger_cfg.get("name") is None:
                logger_cfg.name = Path(cfg.paths.output_dir).name
            if sweep is not None:  # one W&B group per sweep; each job tagged with its overrides
                if logger_cfg.get("group") is None:
                    logger_cfg.group = sweep["group"]
                logger_cfg.name = f"{sweep['group']}-{sweep['job_num']}"
                logger_cfg.tags = list(logger_cfg.get("tags") or []) + [o[:64] for o in sweep["overrides"]]
            mode = os.environ.get("WANDB_MODE")
            if mode in ("offline", "dryrun") or (mode is None and not logger_cfg.get("offline") and not wandb_logged_in()):
                if not logger_cfg.get("offline"):
                    messages.append("W&B: not logged in (or WANDB_MODE=offline): logging offline to "
                                    f"{cfg.paths.output_dir}/wandb")
                logger_cfg.offline = True
    return messages


def log_full_config(loggers, cfg: DictConfig, extra: dict | None = None) -> None:
    """Send the whole composed config (resolved), plus ``extra`` (e.g. the effective batch size) and the
    sweep job's overrides, to every logger as hyperparameters."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.update(extra or {})
    sweep = sweep_job()
    if sweep is not None:
        container["sweep"] = sweep
    for logger in loggers:
        logger.log_hyperparams(container)


def wandb_sync_hint(loggers, cfg: DictConfig) -> str | None:
    """The `wandb sync` command for a W&B run logged offline (as :func:`prepare_logger_configs` decided), if any."""
    from lightning.pytorch.loggers import WandbLogger

    offline = any(isinstance(c, DictConfig) and str(c.get("_target_", "")).endswith("WandbLogger") and c.get("offline")
                  for c in (cfg.get("logger") or {}).values())
    for logger in loggers:
        if offline and isinstance(logger, WandbLogger):
            run_dir = getattr(logger.experiment, "dir", None)
            if run_dir:
                return f"wandb sync {Path(run_dir).parent}"
    return None
