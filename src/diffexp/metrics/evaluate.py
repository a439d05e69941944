"""``evaluate``: the metrics named on the command line, for generated images against the training data."""
from __future__ import annotations

import time

import torch

from diffexp.config import instantiate
from diffexp.metrics.domain import DOMAIN_CLASSIFIERS, load_domain_classifier
from diffexp.metrics.features import build_feature_extractor, extract_features
from diffexp.metrics.reference import reference_features
from diffexp.metrics.scores import (classifier_report, frechet_distance, inception_score, kernel_distance,
                                    lpips_diversity, lpips_model, warn_if_small)

INCEPTION_METRICS = ("fid", "kid", "is")
METRICS = (*INCEPTION_METRICS, "lpips_diversity",
           *(f"{kind}_{name}" for name in DOMAIN_CLASSIFIERS for kind in ("fid", "kid")),
           *(f"{name}_classifier" for name in DOMAIN_CLASSIFIERS))


def check_metric_names(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"metrics={names} includes unknown {unknown}; allowed: {list(METRICS)}")
    return names


def _domain_of(metric: str) -> str:
    return metric.split("_", 1)[1] if metric.startswith(("fid_", "kid_")) else metric.rsplit("_", 1)[0]


def evaluate(names, images: torch.Tensor, train_cfg=None, datamodule=None, device: str | torch.device = "cpu",
             cache_dir=None, inception_weights: str | None = None, reference_split: str = "train") -> dict:
    """Compute each named metric for ``images`` (float [-1, 1] NCHW); returns {metric: value, ...}.

    ``fid``/``kid``/``is`` use torch-fidelity's Inception-v3; ``fid_<dataset>``/``kid_<dataset>``
    use that dataset's committed classifier features (reported under their own name);
    ``<dataset>_classifier`` reports how confidently the classifier recognises the samples.
    Reference features come from ``datamodule`` (or one built from ``train_cfg.data``).
    Every entry carries the sample count ``n``; ``seconds`` is the metric's wall time.
    """
    names = check_metric_names(names)
    if datamodule is None and any(not n.endswith("_classifier") and n not in ("is", "lpips_diversity")
                                  for n in names):
        if train_cfg is None:
            raise ValueError("FID/KID need the training data: pass train_cfg or datamodule")
        datamodule = instantiate(train_cfg.data)
    n = len(images)
    results: dict[str, dict] = {}
    extractors: dict[str, torch.nn.Module] = {}
    features: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def feats(extractor_name: str):
        if extractor_name not in features:
            if extractor_name != "inception" and datamodule is not None and datamodule.name != extractor_name:
                raise ValueError(f"{extractor_name} features compare against data={extractor_name}, but this "
                                 f"model was trained on data={datamodule.name}")
            extractors[extractor_name] = build_feature_extractor(extractor_name, device, inception_weights)
            fake = extract_features(extractors[extractor_name], images)
            real = reference_features(datamodule, extractors[extractor_name], extractor_name, reference_split,
                                      cache_dir=cache_dir)
            features[extractor_name] = (real, fake)
        return features[extractor_name]

    for name in names:
        start = time.perf_counter()
        if name.endswith("_classifier"):
            value = classifier_report(load_domain_classifier(_domain_of(name), device), images)
        elif name == "is":
            logits = extract_features(build_feature_extractor("inception", device, inception_weights,
                                                              feature="logits_unbiased"), images)
            mean, std = inception_score(logits)
            value = {"value": mean, "std": std}
        elif name == "lpips_diversity":
            value = {"value": lpips_diversity(lpips_model().to(device), images)}
        else:
            kind = "inception" if name in INCEPTION_METRICS else "domain"
            extractor_name = "inception" if kind == "inception" else _domain_of(name)
            real, fake = feats(extractor_name)
            small = warn_if_small(n, kind, name)
            if name.startswith("fid"):
                value = {"value": frechet_distance(real, fake)}
            else:
                mean, std = kernel_distance(real, fake)
                value = {"value": mean, "std": std}
            value.update(n_reference=len(real), small_n=small)
        value.update(n=n, seconds=round(time.perf_counter() - start, 3))
        results[name] = value
    return results
