"""Sample-quality metrics: Inception FID/KID/IS, domain-feature FID/KID, classifier recognition, LPIPS."""
from diffexp.metrics.domain import DomainClassifier, DomainFeatures, load_domain_classifier
from diffexp.metrics.evaluate import METRICS, check_metric_names, evaluate, needs_reference, parse_metric
from diffexp.metrics.features import InceptionFeatures, PassThrough, build_feature_extractor, extract_features
from diffexp.metrics.reference import real_images, reference_features
from diffexp.metrics.scores import (classifier_report, frechet_distance, inception_score, kernel_distance,
                                    lpips_distance, lpips_diversity, lpips_model)

__all__ = ["DomainClassifier", "DomainFeatures", "load_domain_classifier", "METRICS", "check_metric_names",
           "evaluate", "needs_reference", "parse_metric", "InceptionFeatures", "PassThrough", "build_feature_extractor", "extract_features",
           "real_images", "reference_features", "classifier_report", "frechet_distance", "inception_score",
           "kernel_distance", "lpips_distance", "lpips_diversity", "lpips_model"]
