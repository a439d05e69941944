"""``python -m diffexp.evaluate ckpt=... metrics=[fid,fd_dinov2,precision_recall] n=50000 reference=STATS.npz``: a
model scored by the protocol papers report (see ``conf/evaluate.yaml``).

For each seed, ``n`` samples are drawn in chunks of ``chunk_size`` (chunk i from its own noise seed, written
to ``out/seed_S/chunk_i.pt``: a stopped evaluation run again with the same ``out=`` draws only what is
missing); each feature network's features of all samples are compared with the reference statistics:
Frechet distance (FID with Inception-v3, FD-DINOv2 with DINOv2 ViT-L/14), KID and precision/recall against the
reference's stored features. The figures of each seed, their mean and standard deviation go to
``out/metrics.json``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


FEATURE_KINDS = ("fid", "kid", "precision_recall")
PROTOCOL_KINDS = (*FEATURE_KINDS, "is", "clip_score")


def plan(names) -> tuple[dict, list[str], set[str]]:
    """(metric -> (kind, network), the feature networks needed, those whose reference features are needed)."""
    from diffexp.metrics.evaluate import check_metric_names, parse_metric

    parsed = {name: parse_metric(name) for name in check_metric_names(names)}
    other = [name for name, (kind, _) in parsed.items() if kind not in PROTOCOL_KINDS]
    if other:
        raise ValueError(f"metrics={list(names)}: {other} are not part of the evaluation protocol; sample.py "
                         f"metrics=[...] computes them. Here: fid, kid, precision_recall, fd_dinov2, is, clip_score "
                         f"and their _digits/_shapes forms")
    networks = sorted({net for kind, net in parsed.values() if kind in FEATURE_KINDS})
    with_features = {net for kind, net in parsed.values() if kind in ("kid", "precision_recall")}
    return parsed, networks, with_features


def reference_datamodule(cfg: DictConfig):
    """The data to compute a reference from: ``data=...``, else the checkpoint's training data."""
    from diffexp.checkpoints import CONFIG_KEY, read_checkpoint

    if cfg.get("data") is not None and "_target_" in cfg.data:
        return instantiate(cfg.data)
    if cfg.get("ckpt"):
        train_cfg = read_checkpoint(cfg.ckpt, "ckpt")[CONFIG_KEY]
        if train_cfg.get("latents"):
            raise ValueError("this model was trained on encoded latents (latents=DIR): pass the image data they "
                             "were encoded from, data=...")
        return instantiate(OmegaConf.create(train_cfg["data"]))
    raise ValueError(f"reference={cfg.reference} does not exist: pass data=... (or ckpt=...) to compute it")


@torch.no_grad()
def compute_reference(cfg: DictConfig, extractors: dict, fingerprints: dict) -> Path:
    """Features of the real images of ``reference_split`` (the first ``reference_n``) for each network, as
    statistics (and a fixed random subset of features) in ``reference``."""
    from tqdm import tqdm

    from diffexp.data.streaming import stream_seed
    from diffexp.encode_latents import batches
    from diffexp.metrics.protocol import feature_statistics, write_reference

    datamodule = reference_datamodule(cfg)
    if hasattr(datamodule, "random_flip"):
        datamodule.random_flip = False
    features = {name: [] for name in extractors}
    count = 0
    bar = tqdm(total=cfg.reference_n, desc="reference", unit="img", disable=not cfg.progress, file=sys.stderr,
               mininterval=2)
    for chunk in batches(datamodule.iter_items(cfg.reference_split, cfg.reference_n), cfg.batch_size):
        images = torch.stack([item["image"] for item in chunk])
        for name, extractor in extractors.items():
            features[name].append(extractor(images).double().cpu())
        count += len(chunk)
        bar.update(len(chunk))
    bar.close()
    if count < 2:
        raise ValueError(f"reference: {count} real images; statistics need at least 2")
    statistics = {}
    for name, parts in features.items():
        real = torch.cat(parts)
        parts.clear()  # one copy of the features at a time
        mu, sigma = feature_statistics(real)
        keep = torch.randperm(len(real), generator=torch.Generator().manual_seed(stream_seed(len(real))))
        statistics[name] = {"mu": mu, "sigma": sigma,
                            "features": real[keep[:cfg.pr_features]].float().numpy()}
    meta = {"n": count, "split": cfg.reference_split,
            "data": OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None,
            "data_name": datamodule.name, "image_size": datamodule.image_size, "channels": datamodule.channels,
            "fingerprints": fingerprints, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_reference(cfg.reference, statistics, meta)


def check_samples_signature(out: Path, signature: dict) -> None:
    """Chunks already in ``out`` must come from the same checkpoint, sampler, guidance and chunking (recorded in
    ``out/samples.json``); otherwise an error, and nothing there is reused or removed."""
    path = out / "samples.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(signature) if before.get(k) != signature.get(k))
        if changed:
            raise ValueError(f"out={str(out)!r} holds samples drawn with other {changed}; use a new out= (nothing "
                             f"there is reused or removed)")
        return
    if out.is_dir() and any(out.glob("seed_*")):
        raise ValueError(f"out={str(out)!r} holds samples of unknown origin (no samples.json); use a new out=")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(signature, indent=2))


def draw_chunks(cfg: DictConfig, model, sampler, guider, seed: int, out: Path, bar) -> list[Path]:
    """The chunk files of ``seed``'s ``n`` samples, drawing those not yet written."""
    from diffexp.api import draw_samples, sampling_conditions
    from diffexp.checkpoints import atomic_torch_save
    from diffexp.images import to_uint8
    from diffexp.metrics.protocol import chunk_path, chunk_seed

    paths = []
    for index, start in enumerate(range(0, cfg.n, cfg.chunk_size)):
        m = min(cfg.chunk_size, cfg.n - start)
        path = chunk_path(out, seed, index)
        if not path.is_file():
            conditions = {k: v[start:start + m] for k, v in sampling_conditions(model, None, start + m).items()}
            images = draw_samples(model, m, sampler, chunk_seed(seed, index), cfg.batch_size, conditions,
                                  progress=False, guidance_scale=cfg.guidance_scale,
                                  guidance_rescale=cfg.guidance_rescale, guider=guider)
            atomic_torch_save({"images": to_uint8(images), "captions": conditions.get("captions")}, path)
        bar.update(m)
        paths.append(path)
    return paths


def score_seed(parsed: dict, paths: list[Path], extractors: dict, statistics: dict, cfg: DictConfig,
               device) -> dict:
    """Every metric of one seed's samples (read back from their chunks)."""
    from diffexp.metrics.features import build_feature_extractor
    from diffexp.metrics.protocol import feature_statistics, frechet_from_statistics
    from diffexp.metrics.scores import clip_score, inception_score, kernel_distance, precision_recall

    features = {name: [] for name in extractors}
    logits, captions, clip_values = [], [], []
    logit_net = build_feature_extractor("inception", device, cfg.inception_weights, feature="logits_unbiased") \
        if any(kind == "is" for kind, _ in parsed.values()) else None
    for path in paths:
        chunk = torch.load(path, weights_only=True)
        images = chunk["images"]
        for name, extractor in extractors.items():
            features[name].append(torch.cat([extractor(b).double().cpu() for b in images.split(cfg.batch_size)]))
        if logit_net is not None:
            logits.append(torch.cat([logit_net(b).double().cpu() for b in images.split(cfg.batch_size)]))
        if any(kind == "clip_score" for kind, _ in parsed.values()):
            if not chunk.get("captions"):
                raise ValueError("clip_score needs captions: it is for text-conditioned models")
            clip_values.append((clip_score(images, chunk["captions"], cfg.clip, device), len(images)))
            captions += chunk["captions"]
    results = {}
    for name, (kind, net) in parsed.items():
        if kind == "fid":
            mu, sigma = feature_statistics(torch.cat(features[net]))
            results[name] = frechet_from_statistics(mu, sigma, statistics[net]["mu"], statistics[net]["sigma"])
        elif kind == "kid":
            results[name], results[f"{name}_std"] = kernel_distance(
                torch.from_numpy(statistics[net]["features"]).double(), torch.cat(features[net]))
        elif kind == "precision_recall":
            scores = precision_recall(torch.from_numpy(statistics[net]["features"]).double(),
                                      torch.cat(features[net]), max_n=cfg.pr_features)
            suffix = name[len("precision_recall"):]
            for key in ("precision", "recall", "density", "coverage"):
                results[f"{key}{suffix}"] = scores[key]
        elif kind == "is":
            results[name], results[f"{name}_std"] = inception_score(torch.cat(logits))
        elif kind == "clip_score":
            results[name] = sum(v * k for v, k in clip_values) / sum(k for _, k in clip_values)
    return results


def summarise(per_seed: list[dict]) -> tuple[dict, dict]:
    """Mean and standard deviation (N - 1; 0 for one seed) of each figure over the seeds."""
    keys = list(per_seed[0])
    values = {key: np.array([row[key] for row in per_seed], dtype=np.float64) for key in keys}
    mean = {key: float(v.mean()) for key, v in values.items()}
    std = {key: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()}
    return mean, std


def run(cfg: DictConfig) -> dict | None:
    from tqdm import tqdm

    from diffexp.api import load_model, make_guider, resolve_device
    from diffexp.cache import weights_fingerprint
    from diffexp.config import check_number
    from diffexp.metrics.features import build_feature_extractor
    from diffexp.metrics.protocol import check_reference, read_reference

    for option in ("n", "chunk_size", "batch_size", "pr_features"):
        check_number(option, cfg[option], integer=True, positive=True)
    check_number("reference_n", cfg.reference_n, integer=True, positive=True, allow_none=True)
    seeds = list(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else [cfg.seeds]
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds={seeds}: give distinct integers, e.g. seeds=[0,1,2]")
    if not OmegaConf.is_list(cfg.metrics) or not cfg.metrics:
        raise ValueError(f"metrics={cfg.metrics!r}: give a list, e.g. metrics=[fid] or metrics=[fid_digits,kid_digits]")
    if cfg.n < 2:
        raise ValueError(f"n={cfg.n}: statistics need at least 2 samples per seed")
    parsed, networks, with_features = plan(cfg.metrics)
    device = resolve_device(cfg.device)
    extractors = {name: build_feature_extractor(name, device, cfg.inception_weights, dinov2=cfg.dinov2).eval()
                  for name in networks}
    fingerprints = {name: weights_fingerprint(net) for name, net in extractors.items()}
    reference = Path(cfg.reference).expanduser()
    if not cfg.get("ckpt"):
        if not networks:
            raise ValueError(f"metrics={list(cfg.metrics)} compare with no reference; pass ckpt=... to evaluate")
        if reference.exists():
            raise FileExistsError(f"reference={str(reference)!r} exists and is never overwritten; pass ckpt=... to "
                                  f"evaluate a model against it, or another reference= to compute a new one")
    if not reference.exists() and networks:
        written = compute_reference(cfg, extractors, fingerprints)
        print(f"[diffexp] reference statistics of {', '.join(networks)} written to {written}", flush=True)
    if not cfg.get("ckpt"):
        return None
    statistics, meta = read_reference(reference) if networks else ({}, {})
    check_reference(statistics, meta, reference, fingerprints, with_features)
    model, train_cfg = load_model(cfg.ckpt, use_ema=cfg.use_ema, device=device)
    data = train_cfg.get("data") or {}
    for key in ("image_size", "channels"):
        if meta.get(key) is not None and data.get(key) is not None and meta[key] != data[key]:
            raise ValueError(f"reference={reference} was computed from {meta.get('data_name')} images with {key}="
                             f"{meta[key]}, but ckpt={cfg.ckpt} makes {key}={data[key]}: compute a reference from "
                             f"this model's data (data=... reference=NEW.npz)")
    sampler = model.make_sampler(instantiate(cfg.sampler) if cfg.get("sampler") else None)
    guider = make_guider(cfg.guider, model) if cfg.get("guider") else None
    out = Path(cfg.out).expanduser()
    check_samples_signature(out, {
        "ckpt": str(Path(cfg.ckpt).expanduser().resolve()), "ckpt_bytes": Path(cfg.ckpt).expanduser().stat().st_size,
        "use_ema": bool(cfg.use_ema), "sampler": [type(sampler).__name__, sampler.nfe(), OmegaConf.to_container(cfg.sampler, resolve=True)
                    if cfg.get("sampler") else None],
        "guider": OmegaConf.to_container(cfg.guider, resolve=True) if cfg.get("guider") else None,
        "guidance_scale": cfg.guidance_scale, "guidance_rescale": cfg.guidance_rescale, "chunk_size": cfg.chunk_size,
        "n": cfg.n})
    bar = tqdm(total=cfg.n * len(seeds), desc="samples", unit="img", disable=not cfg.progress, file=sys.stderr,
               mininterval=2)
    per_seed = []
    for seed in seeds:
        paths = draw_chunks(cfg, model, sampler, guider, seed, out, bar)
        per_seed.append(score_seed(parsed, paths, extractors, statistics, cfg, device))
    bar.close()
    mean, std = summarise(per_seed)
    report = {"ckpt": str(cfg.ckpt), "n": cfg.n, "seeds": seeds, "reference": str(reference),
              "reference_n": meta.get("n"), "sampler": type(sampler).__name__, "nfe": sampler.nfe(),
              "metrics": list(cfg.metrics), "per_seed": per_seed, "mean": mean, "std": std}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    for key, value in mean.items():
        if not key.endswith("_std"):
            print(f"{key}: {value:.4f} +- {std[key]:.4f} ({len(seeds)} seeds x N={cfg.n})", flush=True)
    print(f"[diffexp] figures written to {out / 'metrics.json'}", flush=True)
    return report


if __name__ == "__main__":
    from diffexp.config import run_module_app

    run_module_app("evaluate", run)
