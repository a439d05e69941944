"""FID/KID during training, split across DDP ranks, with its own wall time logged."""
from __future__ import annotations

import math
import time

import torch

from diffexp.callbacks.ema import ema_weights
from diffexp.callbacks.images import PeriodicCallback
from diffexp.lit.interface import SamplingModule
from diffexp.metrics.evaluate import check_metric_names, parse_metric
from diffexp.metrics.features import build_feature_extractor
from diffexp.metrics.reference import reference_features
from diffexp.metrics.scores import frechet_distance, kernel_distance


def rank_indices(num_samples: int, world_size: int, rank: int) -> torch.Tensor:
    """Sample indices drawn by ``rank``: rank, rank + W, ...; padded (repeating the last) to ceil(K / W)."""
    per_rank = math.ceil(num_samples / world_size)
    idx = torch.arange(rank, num_samples, world_size) if rank < num_samples else torch.zeros(0, dtype=torch.long)
    pad = idx[-1:] if len(idx) else torch.zeros(1, dtype=torch.long)
    return torch.cat([idx, pad.expand(per_rank - len(idx))])


def merge_rank_features(gathered: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(W, m, D) features gathered from ranks -> (K, D) in sample-index order (padding dropped)."""
    world, per_rank, dim = gathered.shape
    return gathered.permute(1, 0, 2).reshape(per_rank * world, dim)[:num_samples]


class FIDCallback(PeriodicCallback):
    """Every ``every_n_steps`` steps (and at the end of training) compute ``metrics`` on ``num_samples`` samples.

    Samples come from the EMA weights with the configured ``sampler`` (e.g. DDIM-20) and fixed
    noise (``seed``), so successive figures differ only by the model. Under DDP each rank draws
    its share of the K samples (sample i on rank i mod W), features are all-gathered and put back
    in sample order, so the result equals the single-process one up to float noise. Logged:
    ``val/<metric>``, ``fid/num_samples`` and ``time/fid_seconds`` (this callback's wall time).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 1000, metrics=("fid_digits", "kid_digits"),
                 sampler=None, batch_size: int = 250, seed: int = 1234, reference_split: str = "train",
                 inception_weights: str | None = None, cache_dir: str | None = None, at_end: bool = True):
        super().__init__(every_n_steps, at_end)
        if num_samples < 2 or batch_size <= 0:
            raise ValueError("callbacks.fid: num_samples >= 2 and batch_size > 0 are required")
        self.metrics = check_metric_names(metrics)
        not_fid = [m for m in self.metrics if parse_metric(m).kind not in ("fid", "kid")]
        if not_fid:
            raise ValueError(f"callbacks.fid.metrics may hold FID/KID metrics only, got {not_fid}")
        self.num_samples, self.sampler = num_samples, sampler
        self.batch_size, self.seed, self.reference_split = batch_size, seed, reference_split
        self.inception_weights, self.cache_dir = inception_weights, cache_dir
        self.extractors: dict = {}
        self.real: dict = {}
        self.last: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, SamplingModule):
            raise ValueError(f"callbacks.fid samples from a diffusion model, but {type(pl_module).__name__} does not "
                             f"sample; leave fid out (model=vae goes with callbacks=vae)")
        if self.sampler is not None:
            pl_module.make_sampler(self.sampler)  # a sampler setting this model cannot use fails now, not mid-run
        for name in sorted({parse_metric(m).features for m in self.metrics}):
            if name != "inception" and trainer.datamodule.name != name:
                raise ValueError(f"callbacks.fid.metrics uses {name} features, but data={trainer.datamodule.name}")
            self.extractors[name] = build_feature_extractor(name, pl_module.device, self.inception_weights)

    def on_fit_start(self, trainer, pl_module) -> None:
        for name, extractor in self.extractors.items():  # cached on disk; written atomically, so ranks may race
            self.real[name] = reference_features(trainer.datamodule, extractor, name, self.reference_split,
                                                 cache_dir=self.cache_dir)

    @torch.no_grad()
    def fake_features(self, pl_module, world_size: int = 1, rank: int = 0, all_gather=None) -> dict[str, torch.Tensor]:
        """Features of the K samples, in sample order, from this rank's share (+ all_gather under DDP)."""
        images = []
        for chunk in rank_indices(self.num_samples, world_size, rank).split(self.batch_size):
            x_T, cond = pl_module.monitoring_inputs(self.num_samples, self.seed, chunk)  # by sample index: ranks agree
            images.append(pl_module.sample(len(chunk), sampler=self.sampler, x_T=x_T.to(pl_module.device),
                                           progress=False, **cond))
        images = torch.cat(images)
        features = {}
        for name, extractor in self.extractors.items():
            local = extractor(images).float()
            if world_size > 1:
                gathered = all_gather(local)
                features[name] = merge_rank_features(gathered, self.num_samples).double().cpu()
            else:
                features[name] = local[: self.num_samples].double().cpu()
        return features

    def compute(self, fake: dict[str, torch.Tensor]) -> dict[str, float]:
        values = {}
        for metric in self.metrics:
            kind, features = parse_metric(metric)
            real, feats = self.real[features], fake[features]
            if kind == "fid":
                values[metric] = frechet_distance(real, feats)
            else:
                values[metric] = kernel_distance(real, feats)[0]
        return values

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        start = time.perf_counter()
        with ema_weights(trainer, pl_module):
            fake = self.fake_features(pl_module, trainer.world_size, trainer.global_rank, pl_module.all_gather)
        values = self.compute(fake)
        seconds = time.perf_counter() - start
        logged = {f"val/{k}": v for k, v in values.items()}
        logged.update({"fid/num_samples": float(self.num_samples), "time/fid_seconds": seconds})
        for key, value in logged.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
        self.last = logged
        return logged

    def make(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)
