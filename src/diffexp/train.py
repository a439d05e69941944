"""train.py's run(cfg): build data, model, callbacks, loggers, trainer; fit; return the swept metric."""
from __future__ import annotations

import math
import os
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp.cache import weights_fingerprint
from diffexp.callbacks.ema import ema_weights
from diffexp.checkpoints import WEIGHTS_NAME, CheckpointError, UnsafeCheckpointError, load_file, save_weights
from diffexp.config import build_model, check_number, instantiate
from diffexp.distributed import (launch_environment_restored, prepare_ddp_children, set_rank_for_logging,
                                 threads_for_this_task)
from diffexp.fsdp import check_sharded_callbacks, is_sharded
from diffexp.lit import DiffusionModel
from diffexp.lit.checkpoint_io import SafeCheckpointIO
from diffexp.loggers import log_full_config, prepare_logger_configs, wandb_sync_hint
from diffexp.runinfo import update_run_info, write_run_info


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a name -> config mapping (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def check_ckpt_path(ckpt_path: str | None) -> None:
    if ckpt_path is not None and Path(ckpt_path).is_dir():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} is a directory; pass the .ckpt file to resume from, e.g. "
                                f"{str(Path(ckpt_path) / 'last.ckpt')!r}")
    if ckpt_path is not None and Path(ckpt_path).suffix == ".safetensors":
        raise ValueError(f"ckpt_path={ckpt_path!r} holds weights only (no optimizer or loop state), so training cannot "
                         f"resume from it; resume from a .ckpt file of the run (e.g. last.ckpt beside it), or sample "
                         f"from it with sample.py ckpt=")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist; pass the path of a .ckpt file to resume "
                                f"(e.g. logs/train/runs/<run>/checkpoints/last.ckpt) or leave it null")


def resume_checkpoint(ckpt_path: str | None) -> tuple[str | None, dict | None]:
    """(path, contents) of ``ckpt_path`` if it loads; else of the newest loadable checkpoint beside it (saying
    so); else a clear error. A checkpoint that does not load is one cut short by a crash, or not a checkpoint."""
    if ckpt_path is None:
        return None, None
    check_ckpt_path(ckpt_path)
    try:
        return ckpt_path, load_file(ckpt_path, "ckpt_path")
    except UnsafeCheckpointError:
        raise  # never skipped over: someone put a file that could run code here
    except CheckpointError as error:
        problem = error
    others = sorted((p for p in Path(ckpt_path).parent.glob("*.ckpt") if p.resolve() != Path(ckpt_path).resolve()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    unsafe = []
    for candidate in others:
        try:
            checkpoint = load_file(candidate, "ckpt_path")
        except UnsafeCheckpointError:
            unsafe.append(candidate.name)  # never loaded, and said so below
            continue
        except CheckpointError:
            continue
        skipped = f" (skipped, as they could run code: {', '.join(unsafe)})" if unsafe else ""
        rank_zero_warn(f"{problem}. Resuming from the newest checkpoint that loads instead: {candidate}{skipped}")
        return str(candidate), checkpoint
    skipped = f"; refused as they could run code: {', '.join(unsafe)}" if unsafe else ""
    raise CheckpointError(f"{problem}; no other checkpoint in {Path(ckpt_path).parent} loads either{skipped}")


def build(cfg: DictConfig):
    """Instantiate (datamodule, model, callbacks, loggers, trainer) from a composed train config.

    Everything a user can get wrong (sizes, sampler settings, paths) raises here, before training.
    """
    check_ckpt_path(cfg.get("ckpt_path"))
    every = cfg.get("eval_every")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every <= 0):
        raise ValueError(f"eval_every must be a positive number of optimizer steps (between grids, FID, checkpoints "
                         f"and validation), got {every!r}")
    datamodule = latents_datamodule(cfg) if cfg.get("latents") else instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    if cfg.get("latents"):
        check_latents_autoencoder(model, datamodule)
    warn_unused_schedule(model)
    if cfg.get("init_from"):
        start_from_weights(model, cfg)
    if getattr(model, "distill", None) is not None:
        attach_teacher(model, cfg)
    if cfg.get("cache_latents"):
        if not isinstance(model, DiffusionModel):
            raise ValueError(f"cache_latents=true pre-encodes the data for latent diffusion; model={cfg.model._target_} "
                             f"does not diffuse (use cache_latents=false)")
        datamodule = model.space.cached(datamodule)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)  # with the values build_model derived
    callbacks = instantiate_dict(cfg.get("callbacks"))
    for message in prepare_logger_configs(cfg):
        rank_zero_info(f"[diffexp] {message}")
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks += quiet_progress_bar(cfg.trainer, callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_sharded_callbacks(trainer, callbacks)
    return datamodule, model, callbacks, loggers, trainer


def latents_datamodule(cfg):
    """``latents=DIR``: train on latents encoded by ``python -m diffexp.encode_latents`` (their data's sizes and
    classes; this run's batch size, workers and data seed)."""
    from diffexp.data.latent_shards import LatentShardsDataModule

    if cfg.get("cache_latents"):
        rank_zero_info(f"[diffexp] latents={cfg.latents}: training on latents encoded beforehand, so "
                       f"cache_latents=true (which would encode them again) is ignored")
        cfg.cache_latents = False
    data = cfg.data
    datamodule = LatentShardsDataModule(cfg.latents, batch_size=data.get("batch_size", 64),
                                        num_workers=data.get("num_workers", 0), seed=data.get("seed", 0))
    for option in ("image_size", "channels"):
        if data.get(option) is not None and data[option] != getattr(datamodule, option):
            raise ValueError(f"latents={cfg.latents} were encoded from {datamodule.manifest['data_name']} at "
                             f"{option}={getattr(datamodule, option)}, but data.{option}={data[option]}; set "
                             f"data.{option}={getattr(datamodule, option)} (or pick the data= it was encoded from)")
    return datamodule


def check_latents_autoencoder(model, datamodule) -> None:
    """The model's autoencoder must be the one the latents were encoded with (same weights)."""
    from diffexp.cache import weights_fingerprint

    autoencoder = getattr(getattr(model, "space", None), "autoencoder", None)
    manifest = datamodule.manifest
    if autoencoder is None:
        raise ValueError(f"latents={datamodule.root} holds latents of {manifest['vae_name']}; this model diffuses "
                         f"pixels: use model=latent with the same vae=")
    if weights_fingerprint(autoencoder) != manifest["vae_fingerprint"]:
        raise ValueError(f"latents={datamodule.root} were encoded with {manifest['vae_name']}, whose weights differ "
                         f"from this run's vae ({autoencoder.name}); use the same vae= as the encoding, or encode again")


def warn_unused_schedule(model) -> None:
    """``schedule=`` / ``schedule.*`` typed on the command line of a model whose path is not DDPM's discrete one (whose
    betas the schedule sets): say that it has no effect."""
    if not isinstance(model, DiffusionModel) or getattr(model.path, "schedule", None) is not None \
            or not HydraConfig.initialized():
        return
    typed = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=")[0].split(".")[0] == "schedule"]
    if typed:
        rank_zero_warn(f"{' '.join(typed)} has no effect: the schedule sets the betas of DDPM's discrete path, and this "
                       f"model's path is {model.path!r} (path=, formulation=)")


def start_from_weights(model, cfg: DictConfig) -> None:
    """``init_from=CKPT``: the weights of another run (EMA by default) as the starting point of this one."""
    from diffexp.finetune import adapter_summary, load_initial_weights

    if not isinstance(model, DiffusionModel):
        raise ValueError(f"init_from= starts a diffusion model from a trained one; model={cfg.model._target_} "
                         f"does not diffuse")
    if not isinstance(cfg.get("init_from_ema", True), bool):
        raise ValueError(f"init_from_ema must be true or false, got {cfg.init_from_ema!r}")
    loaded = load_initial_weights(model, cfg.init_from, use_ema=cfg.get("init_from_ema", True))
    rank_zero_info(f"[diffexp] initial weights from {loaded['path']} ({'EMA' if cfg.get('init_from_ema', True) else 'raw'}"
                   f" where saved); optimizer and step count start fresh")
    if model.lora is not None:
        rank_zero_info(f"[diffexp] LoRA: {adapter_summary(model)}")
    if cfg.get("ckpt_path"):
        rank_zero_warn(f"init_from={cfg.init_from} and ckpt_path={cfg.ckpt_path}: resuming from ckpt_path, whose "
                       f"weights replace the initial ones")


def attach_teacher(model, cfg: DictConfig) -> None:
    """``distill=``: the teacher checkpoint of ``init_from`` (EMA weights where saved, as the student's start) loaded,
    checked against the student and attached frozen (:meth:`diffexp.lit.distill.Distillation.attach_teacher`);
    a method that never calls it keeps only its fingerprint."""
    from diffexp.api import load_model

    distill = model.distill
    if not cfg.get("init_from"):
        raise ValueError(f"distill={distill.method} distils a trained model: give its checkpoint as init_from=TEACHER "
                         f"(a .ckpt or model.safetensors of a diffexp run)")
    teacher, _ = load_model(cfg.init_from, use_ema=cfg.get("init_from_ema", True))
    distill.attach_teacher(model, teacher)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and Path(ckpt_path).is_file():  # a resume: the same teacher, checked before any work (reflow's pairs)
        from diffexp.lit.distill import STATE_KEY

        state = load_file(ckpt_path, "ckpt_path").get(STATE_KEY)
        if state is not None:
            distill.load_state_dict(state)
    if not distill.needs_teacher:
        distill.teacher = None
    rank_zero_info(f"[diffexp] distill={distill.method}: teacher {cfg.init_from} (weights {distill.teacher_fingerprint}"
                   f"{'' if distill.needs_teacher else ', used as the starting point only'})")


def matmul_precision(value: str, trainer) -> str:
    """``torch.set_float32_matmul_precision``'s value: ``auto`` -> ``high`` (TF32 matmuls) on a CUDA device,
    ``highest`` (exact float32) elsewhere; ``highest`` | ``high`` | ``medium`` as given."""
    allowed = ("auto", "highest", "high", "medium")
    if value not in allowed:
        raise ValueError(f"matmul_precision must be one of {list(allowed)}, got {value!r}")
    if value == "auto":
        return "high" if trainer.strategy.root_device.type == "cuda" else "highest"
    return value


def quiet_progress_bar(trainer_cfg: DictConfig, callbacks: list) -> list:
    """A tqdm progress bar refreshed every ``log_every_n_steps`` steps (Lightning's default, Rich or tqdm, reads the
    logged loss every step, which waits for the GPU each time), unless the config brings its own or none."""
    if not trainer_cfg.get("enable_progress_bar", True) or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [TQDMProgressBar(refresh_rate=max(1, int(trainer_cfg.get("log_every_n_steps") or 1)))]


def effective_batch(cfg: DictConfig, trainer) -> dict:
    """Images per optimizer step: data.batch_size (per device) x world size x gradient accumulation.

    The learning rate is not rescaled automatically; when changing the number of devices, scale
    ``model.optimizer.lr`` yourself (linear rule: lr x new/old effective batch, with warm-up).
    """
    per_device = int(cfg.data.batch_size)
    accumulate = int(trainer.accumulate_grad_batches)
    return {"batch_size_per_device": per_device, "world_size": int(trainer.world_size),
            "accumulate_grad_batches": accumulate, "effective_batch_size": per_device * trainer.world_size * accumulate}


def check_replicas(module: torch.nn.Module) -> list[str]:
    """The weights fingerprint (:func:`diffexp.cache.weights_fingerprint`) of every rank (one entry without a
    process group); raises if DDP replicas differ.

    DDP keeps replicas identical by construction (same initial weights, all-reduced gradients, same optimizer
    steps); a difference means something rank-dependent leaked into the update."""
    digest = weights_fingerprint(module)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [digest]
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas diverged: weight digests per rank {digests}")
    return digests


def update_latest_link(run_dir: Path, link: Path) -> None:
    """Point ``link`` (e.g. logs/train/latest) at the newest run directory, atomically."""
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(run_dir.resolve(), link.parent.resolve()), target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        pass


# The datamodules' samplers continue a resumed epoch where it stopped (data/base.py), which Lightning cannot see.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def run(cfg: DictConfig) -> float | None:
    """Train as configured and return ``cfg.optimized_metric`` (for sweeps; None when it is null)."""
    run_dir = Path(cfg.paths.output_dir)
    set_rank_for_logging(cfg.trainer.get("devices"))
    threads_for_this_task()
    check_number("seed", cfg.seed, integer=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rank_zero_info(f"[diffexp] seed {cfg.seed}")
    datamodule, model, callbacks, loggers, trainer = build(cfg)
    torch.set_float32_matmul_precision(matmul_precision(cfg.get("matmul_precision", "highest"), trainer))
    scale = effective_batch(cfg, trainer)
    if trainer.is_global_zero:
        write_run_info(run_dir, cfg.seed, extra=scale)
        rank_zero_info(f"Run directory: {run_dir.resolve()}")
        rank_zero_info(f"[diffexp] effective batch size {scale['effective_batch_size']} = {scale['batch_size_per_device']}"
                       f" per device x {scale['world_size']} devices x {scale['accumulate_grad_batches']} accumulated")
    log_full_config(loggers, cfg, extra=scale)
    prepare_ddp_children(trainer)
    ckpt_path, checkpoint = resume_checkpoint(cfg.get("ckpt_path"))
    if checkpoint is not None and isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO):
        trainer.strategy.checkpoint_io.preload(ckpt_path, checkpoint)
    del checkpoint
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except RuntimeError as error:
        if ckpt_path is None or "Error(s) in loading state_dict" not in str(error):
            raise
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), "")
        raise CheckpointError(f"ckpt_path={ckpt_path!r} holds a model of another shape than this config builds "
                              f"({detail[:200]}); resume with the overrides it was trained with (its run directory's "
                              f".hydra/overrides.yaml)") from None
    sharded = is_sharded(trainer)
    replicas = None if sharded else check_replicas(model)  # FSDP keeps one sharded copy, no replicas
    full_state = trainer.strategy.lightning_module_state_dict() if sharded else None  # gathered by every rank
    if trainer.is_global_zero:
        update_run_info(run_dir, {"replica_weight_digests": replicas})
        with ema_weights(trainer, model):  # the weights to share: EMA when it is on
            state = full_state if sharded else model.state_dict()
            save_weights(state, model.run_config, run_dir / "checkpoints" / WEIGHTS_NAME)
            if isinstance(model, DiffusionModel) and model.lora is not None:
                from diffexp.finetune import ADAPTER_NAME, save_adapter

                adapter = save_adapter(model, state, model.run_config, run_dir / "checkpoints" / ADAPTER_NAME)
                rank_zero_info(f"[diffexp] LoRA adapter ({adapter.stat().st_size / 1024:.0f} KiB): {adapter}; sample "
                               f"with: python sample.py ckpt={cfg.init_from or 'BASE'} lora={adapter}")
    hint = wandb_sync_hint(loggers, cfg) if trainer.is_global_zero else None
    if hint:
        rank_zero_info(f"[diffexp] offline W&B run; upload it with: {hint}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero and cfg.paths.get("latest_link"):
        update_latest_link(run_dir, Path(cfg.paths.latest_link))
    return optimized_value(cfg.get("optimized_metric"), metrics, in_sweep())


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def optimized_value(metric_name: str | None, metrics: dict[str, float], sweep: bool) -> float | None:
    """The value a sweep optimises. When training never logged it: in a sweep (which would otherwise optimise
    nothing) a clear error; in a single run, whose checkpoints are what counts, a warning and None."""
    if not metric_name:
        return None
    if metric_name not in metrics:
        message = (f"optimized_metric={metric_name!r} was never logged by this run; logged: {sorted(metrics)}. "
                   f"Add the callback that logs it (e.g. callbacks=[default,fid] for val/fid_digits), make sure "
                   f"validation runs (eval_every <= trainer.max_steps), or set optimized_metric=null")
        if sweep:
            raise ValueError(message)
        rank_zero_warn(message)
        return None
    return metrics[metric_name]


def anchor_paths(cfg: DictConfig) -> None:
    """Make a relative ``paths.root_dir`` absolute from the directory train.py was started in, so logs/, data/
    and the latest-run link stay put with ``hydra.job.chdir=true`` and the saved config says where they are.
    (It is relative in the config so that a sweep's parent can resolve ``hydra.sweep.dir``.)"""
    root = cfg.paths.get("root_dir")
    if HydraConfig.initialized() and root is not None and not Path(str(root)).is_absolute():
        with open_dict(cfg):
            cfg.paths.root_dir = os.path.normpath(os.path.join(HydraConfig.get().runtime.cwd, str(root)))


def run_safely(cfg: DictConfig) -> float | None:
    """run(cfg), always printing the run directory and closing W&B.

    In a multirun a failing job is logged (RUN/error.txt) and returns NaN, so the sweep goes on.
    """
    run_dir = Path(cfg.paths.output_dir)
    anchor_paths(cfg)
    try:
        with launch_environment_restored():
            return run(cfg)
    except Exception as error:
        if not in_sweep() or type(error).__module__.startswith("submitit"):
            raise  # submitit's time-limit signal must reach submitit: the job did not finish
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
        print(f"[diffexp] job failed; traceback in {run_dir / 'error.txt'}")
        return math.nan
    finally:
        if rank_zero_only.rank == 0:
            print(f"[diffexp] output dir: {run_dir.resolve()}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next job of a sweep forms its own group
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        except ImportError:
            pass
