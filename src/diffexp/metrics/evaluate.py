"""``evaluate``: the metrics named on the command line, for generated images against the training data."""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from diffexp.metrics.domain import DOMAIN_CLASSIFIERS, load_domain_classifier
from diffexp.metrics.features import build_feature_extractor, extract_features
from diffexp.metrics.reference import reference_features
from diffexp.metrics.scores import (classifier_report, clip_score, frechet_distance, inception_score,
                                    kernel_distance, lpips_diversity, lpips_model, precision_recall, warn_if_small)

GENERAL_FEATURES = ("inception", "dinov2")  # networks not tied to one dataset

INCEPTION_METRICS = ("fid", "kid", "is", "precision_recall")
METRICS = (*INCEPTION_METRICS, "lpips_diversity", "fd_dinov2", "clip_score",
           *(f"{kind}_{name}" for name in DOMAIN_CLASSIFIERS for kind in ("fid", "kid", "precision_recall")),
           *(f"{name}_classifier" for name in DOMAIN_CLASSIFIERS))


def check_metric_names(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"metrics={names} includes unknown {unknown}; allowed: {list(METRICS)}")
    return names


class MetricName(NamedTuple):
    """A metric name read apart: ``kind`` (fid, kid, is, lpips_diversity, classifier) and ``features``
    (inception, a domain such as digits, or None)."""

    kind: str
    features: str | None


def parse_metric(name: str) -> MetricName:
    """The one reading of metric names: ``fid``/``kid``/``is`` -> Inception features; ``fid_digits``,
    ``kid_digits`` -> digits-classifier features; ``digits_classifier`` -> that classifier's report;
    ``lpips_diversity``."""
    check_metric_names([name])
    if name in INCEPTION_METRICS:
        return MetricName(name, "inception")
    if name == "fd_dinov2":  # the Frechet distance of DINOv2 features (Stein et al. 2023)
        return MetricName("fid", "dinov2")
    if name == "clip_score":
        return MetricName(name, None)
    if name.startswith("precision_recall_"):
        return MetricName("precision_recall", name[len("precision_recall_"):])
    if name.endswith("_classifier"):
        return MetricName("classifier", name.rsplit("_", 1)[0])
    if name == "lpips_diversity":
        return MetricName(name, None)
    kind, features = name.split("_", 1)
    return MetricName(kind, features)


def needs_reference(names) -> bool:
    """Whether any of the metrics compares against the training data's features (FID/KID)."""
    return any(parse_metric(n).kind in ("fid", "kid", "precision_recall") for n in names)


def evaluate(names, images: torch.Tensor, datamodule=None, device: str | torch.device = "cpu",
             cache_dir=None, inception_weights: str | None = None, reference_split: str = "train",
             dinov2: str | None = None, captions: list[str] | None = None, clip: str | None = None) -> dict:
    """Compute each named metric for ``images`` (float [-1, 1] NCHW); returns {metric: value, ...}.

    ``fid``/``kid``/``is``/``precision_recall`` use torch-fidelity's Inception-v3, ``fd_dinov2`` DINOv2
    ViT-L/14 (``dinov2``: its folder); ``fid_<dataset>``/``kid_<dataset>``/``precision_recall_<dataset>``
    use that dataset's committed classifier features (reported under their own name);
    ``<dataset>_classifier`` reports how confidently the classifier recognises the samples; ``clip_score``
    needs the ``captions`` and CLIP (``clip``: its folder).
    Reference features come from ``datamodule`` (an :class:`diffexp.data.ImageDataModule`).
    Every entry carries the sample count ``n``; ``seconds`` is the metric's wall time.
    """
    if needs_reference(names) and datamodule is None:
        raise ValueError("FID/KID need the training data: pass the datamodule")
    n = len(images)
    results: dict[str, dict] = {}
    extractors: dict[str, torch.nn.Module] = {}
    features: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def feats(extractor_name: str):
        if extractor_name not in features:
            if extractor_name not in GENERAL_FEATURES and datamodule is not None and datamodule.name != extractor_name:
                raise ValueError(f"{extractor_name} features compare against data={extractor_name}, but this "
                                 f"model was trained on data={datamodule.name}")
            extractors[extractor_name] = build_feature_extractor(extractor_name, device, inception_weights,
                                                                 dinov2=dinov2)
            fake = extract_features(extractors[extractor_name], images)
            real = reference_features(datamodule, extractors[extractor_name], extractor_name, reference_split,
                                      cache_dir=cache_dir)
            features[extractor_name] = (real, fake)
        return features[extractor_name]

    for name in names:
        start = time.perf_counter()
        kind, extractor_name = parse_metric(name)
        if kind == "classifier":
            value = classifier_report(load_domain_classifier(extractor_name, device), images)
        elif kind == "is":
            logits = extract_features(build_feature_extractor("inception", device, inception_weights,
                                                              feature="logits_unbiased"), images)
            mean, std = inception_score(logits)
            value = {"value": mean, "std": std}
        elif kind == "lpips_diversity":
            value = {"value": lpips_diversity(lpips_model().to(device), images)}
        elif kind == "clip_score":
            if captions is None:
                raise ValueError("clip_score needs the captions of the samples: it is for text-conditioned models")
            value = {"value": clip_score(images, captions, clip, device)}
        else:
            real, fake = feats(extractor_name)
            small = warn_if_small(n, "inception" if extractor_name in GENERAL_FEATURES else "domain", name)
            if kind == "fid":
                value = {"value": frechet_distance(real, fake)}
            elif kind == "precision_recall":
                value = precision_recall(real, fake)
            else:
                mean, std = kernel_distance(real, fake)
                value = {"value": mean, "std": std}
            value.update(n_reference=len(real), small_n=small)
        value.update(n=n, seconds=round(time.perf_counter() - start, 3))
        results[name] = value
    return results
