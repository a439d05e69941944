"""Metrics against their definitions: FID/KID/IS behaviour, caching, Inception and LPIPS paths, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from diffexp.data import DigitsDataModule
from diffexp.metrics import (InceptionFeatures, check_metric_names, classifier_report, evaluate, frechet_distance,
                             inception_score, kernel_distance, load_domain_classifier, lpips_distance, lpips_model,
                             real_images, reference_features)
from diffexp.metrics.domain import DomainFeatures
from diffexp.metrics.features import inception_weights_path


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID from its definition (Heusel et al. 2017) with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    return dm, real_images(dm, "train")


@pytest.fixture(scope="module")
def digit_features(digits):
    return DomainFeatures(load_domain_classifier("digits"))(digits[1]).double()


def test_fid_matches_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    b = 0.5 + 1.3 * torch.randn(400, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(scipy_fid(a.numpy(), b.numpy()), rel=1e-6)


def test_fid_zero_on_itself_and_grows_with_noise(digits):
    _, images = digits
    extractor = DomainFeatures(load_domain_classifier("digits"))
    real = extractor(images).double()
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (0.0, 0.2, 0.5, 1.0):
        noisy = (images + sigma * torch.randn(images.shape, generator=g)).clamp(-1, 1)
        fids.append(frechet_distance(real, extractor(noisy).double()))
    assert abs(fids[0]) < 1e-3 * fids[1]
    assert fids == sorted(fids)


def test_kid_zero_between_halves_of_real_and_grows_with_noise(digits):
    """KID is unbiased: two disjoint halves of the real set give ~0; added noise makes it grow."""
    _, images = digits
    extractor = DomainFeatures(load_domain_classifier("digits"))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    a, b = images[perm[:800]], images[perm[800:1600]]
    fa = extractor(a).double()
    g = torch.Generator().manual_seed(1)
    kids = [kernel_distance(fa, extractor(b).double(), subsets=50, subset_size=400)]
    for sigma in (0.2, 0.5, 1.0):
        noisy = (b + sigma * torch.randn(b.shape, generator=g)).clamp(-1, 1)
        kids.append(kernel_distance(fa, extractor(noisy).double(), subsets=50, subset_size=400))
    (same, same_std), rest = kids[0], [k[0] for k in kids[1:]]
    assert abs(same) < 3 * same_std / 50 ** 0.5 + 1e-4 and abs(same) < 0.2 * rest[0]
    assert rest == sorted(rest)


def test_kid_is_deterministic_and_leaves_global_rng_alone(digit_features):
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    a = kernel_distance(digit_features[:600], digit_features[600:1200], subsets=10, subset_size=300)
    assert torch.equal(torch.rand(2), expected)
    assert a == kernel_distance(digit_features[:600], digit_features[600:1200], subsets=10, subset_size=300)


def test_inception_score_bounds():
    """IS is 1 for identical one-hot predictions and the class count for uniform one-hot ones."""
    one_class = torch.full((100, 10), -20.0)
    one_class[:, 3] = 20.0
    assert inception_score(one_class, splits=2)[0] == pytest.approx(1.0, abs=1e-4)
    spread = torch.full((100, 10), -20.0)
    spread[torch.arange(100), torch.arange(100) % 10] = 20.0
    assert inception_score(spread, splits=1)[0] == pytest.approx(10.0, rel=1e-3)


def test_classifier_recognises_real_digits(digits):
    dm, _ = digits
    report = classifier_report(load_domain_classifier("digits"), real_images(dm, "val"))
    assert report["confident_fraction"] > 0.95 and report["classes_present"] == 10
    noise = torch.rand(200, 1, 16, 16) * 2 - 1
    assert classifier_report(load_domain_classifier("digits"), noise)["confident_fraction"] < 0.9


def test_reference_features_cached(digits, tmp_path, monkeypatch):
    dm, _ = digits
    extractor = DomainFeatures(load_domain_classifier("digits"))
    first = reference_features(dm, extractor, "digits", "val", cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("digits-val-16px-1ch-digits-")

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr("diffexp.metrics.reference.extract_features", fail)
    assert torch.equal(reference_features(dm, extractor, "digits", "val", cache_dir=tmp_path), first)
    monkeypatch.undo()
    changed = DomainFeatures(load_domain_classifier("digits"))  # other weights: a new entry, not the stale one
    changed.classifier.feature_scale.mul_(2)
    assert torch.allclose(reference_features(dm, changed, "digits", "val", cache_dir=tmp_path), 2 * first)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_evaluate_reports_n_and_warns(digits, tmp_path):
    dm, images = digits
    with pytest.warns(UserWarning, match="N=100"):
        out = evaluate(["fid_digits", "kid_digits", "digits_classifier"], images[:100], datamodule=dm,
                       cache_dir=tmp_path)
    assert out["fid_digits"]["n"] == 100 and out["fid_digits"]["small_n"] is True
    assert out["fid_digits"]["n_reference"] == len(images)
    assert out["digits_classifier"]["n"] == 100


def test_bad_metric_names():
    with pytest.raises(ValueError, match="allowed"):
        check_metric_names(["fid_cifar"])


def test_inception_weights_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        inception_weights_path()
    with pytest.raises(FileNotFoundError, match="fid_digits"):
        evaluate(["fid"], torch.zeros(4, 1, 16, 16), datamodule=DigitsDataModule(), cache_dir=tmp_path)


def test_inception_features_path_with_random_weights(tmp_path, monkeypatch):
    """Runs torch-fidelity's network end to end (uint8 conversion, resize to 299, 2048 features)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path / "random-inception.pth"
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    torch.save(fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), path)
    monkeypatch.undo()
    features = InceptionFeatures("2048", weights_path=path)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = features(x)
    assert out.shape == (3, 2048) and torch.isfinite(out).all()
    uint8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(features(uint8), out)  # uint8 and [-1, 1] floats give the same features
    logits = InceptionFeatures("logits_unbiased", weights_path=path)(x)
    assert logits.shape == (3, 1008)


def test_lpips(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        lpips_model("alex")
    model = lpips_model("alex", pretrained_backbone=False)  # random backbone, shipped linear heads
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.allclose(lpips_distance(model, x, x), torch.zeros(4), atol=1e-6)
    assert (lpips_distance(model, x, x.flip(0)) > 0).all()
