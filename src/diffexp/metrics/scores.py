"""Sample-quality figures computed by torchmetrics / lpips from images or features.

The torchmetrics objects here are fed complete feature sets (under DDP the callers gather
them first), so their own cross-process sync is off: it would count every sample once per rank.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from diffexp.metrics.features import PassThrough

# Below this many samples FID's bias dominates differences between models (Chong & Forsyth 2020).
MIN_RELIABLE_N = {"inception": 2048, "domain": 1000}


def warn_if_small(n: int, kind: str, metric: str) -> bool:
    """Warn (and return True) when ``n`` samples are too few for ``metric`` to be compared across runs."""
    minimum = MIN_RELIABLE_N[kind]
    if n < minimum:
        warnings.warn(f"{metric} from N={n} samples is biased upward (recommended N >= {minimum}); "
                      f"compare only figures computed at the same N", stacklevel=2)
        return True
    return False


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) (Heusel et al. 2017), via torchmetrics."""
    metric = FrechetInceptionDistance(feature=PassThrough(real_features.shape[1]), sync_on_compute=False)
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def kernel_distance(real_features: torch.Tensor, fake_features: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel; mean and std over subsets."""
    subset_size = min(subset_size, len(real_features), len(fake_features))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # torchmetrics draws subsets from the global generator
    try:
        metric = KernelInceptionDistance(feature=PassThrough(real_features.shape[1]), subsets=subsets,
                                         subset_size=subset_size, sync_on_compute=False)
        metric.update(real_features.double(), real=True)
        metric.update(fake_features.double(), real=False)
        mean, std = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) over ``splits`` splits, from Inception logits."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # torchmetrics shuffles before splitting
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            metric = InceptionScore(feature=PassThrough(logits.shape[1]), splits=splits, sync_on_compute=False)
        metric.update(logits.double())
        mean, std = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


@torch.no_grad()
def classifier_report(classifier, images: torch.Tensor, threshold: float = 0.9, batch_size: int = 512) -> dict:
    """How a domain classifier sees generated images: confident fraction, mean confidence, classes present."""
    probs = torch.cat([classifier(images[i:i + batch_size]).softmax(-1).cpu()
                       for i in range(0, len(images), batch_size)])
    confidence, predicted = probs.max(-1)
    counts = torch.bincount(predicted, minlength=probs.shape[1])
    return {
        "confident_fraction": round(float((confidence >= threshold).float().mean()), 4),
        "confidence_threshold": threshold,
        "mean_confidence": round(float(confidence.mean()), 4),
        "classes_present": int((counts > 0).sum()),
        "num_classes": probs.shape[1],
        "class_counts": counts.tolist(),
    }


LPIPS_BACKBONES = {"alex": ("alexnet", "alexnet-owt-7be5be79.pth"), "vgg": ("vgg16", "vgg16-397923af.pth"),
                   "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth")}


def lpips_model(net: str = "alex", pretrained_backbone: bool = True):
    """``lpips.LPIPS`` in eval mode (Zhang et al. 2018). The ImageNet backbone comes from torchvision's cache
    file, read here with ``weights_only=True`` (torchvision itself would unpickle it with ``weights_only=False``);
    without the file, a clear error. The linear heads ship inside the ``lpips`` package."""
    import lpips
    import torchvision

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    if pretrained_backbone:
        from diffexp.checkpoints import load_file

        arch, file = LPIPS_BACKBONES[net]
        path = Path(torch.hub.get_dir()) / "checkpoints" / file
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS needs torchvision's {net} weights at {path}; download them on a machine "
                                    f"with internet (e.g. torchvision.models.{arch}(weights='DEFAULT')) and copy the "
                                    f"file there")
        backbone = getattr(torchvision.models, arch)()
        backbone.load_state_dict(load_file(path, option=f"LPIPS backbone {file}", legacy_format=True))
        # lpips splits torchvision's ``features`` into slices whose children are named by their index there
        for piece in model.net.children():
            for index, layer in piece.named_children():
                layer.load_state_dict(backbone.features[int(index)].state_dict())
    return model


@torch.no_grad()
def lpips_distance(model, a: torch.Tensor, b: torch.Tensor, batch_size: int = 256, min_size: int = 64) -> torch.Tensor:
    """Per-pair LPIPS (Zhang et al. 2018) between float images in [-1, 1].

    Grayscale is repeated to RGB; images smaller than ``min_size`` are upsampled (bilinear) so
    the backbone's deepest layers still see a spatial map.
    """
    def rgb(x):
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        if min(x.shape[-2:]) < min_size:
            x = torch.nn.functional.interpolate(x.float(), size=(min_size, min_size), mode="bilinear",
                                                align_corners=False)
        return x

    device = next(model.parameters()).device
    return torch.cat([model(rgb(a[i:i + batch_size]).to(device), rgb(b[i:i + batch_size]).to(device)).flatten().cpu()
                      for i in range(0, len(a), batch_size)])


def lpips_diversity(model, images: torch.Tensor, pairs: int = 500, seed: int = 0) -> float:
    """Mean LPIPS between random pairs of distinct samples: higher = more diverse."""
    generator = torch.Generator().manual_seed(seed)
    i = torch.randint(len(images), (pairs,), generator=generator)
    j = (i + torch.randint(1, len(images), (pairs,), generator=generator)) % len(images)
    return float(lpips_distance(model, images[i], images[j]).mean())


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, nearest_k: int = 3,
                     max_n: int = 10_000, seed: int = 0) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of samples inside the real data's
    k-NN manifold (balls reaching each real feature's k-th neighbour) and of real features inside the samples'
    one; with density and coverage (Naeem et al. 2020), all from the ``prdc`` library. k = 3 as the paper.
    ``prdc`` holds full distance matrices, so at most ``max_n`` of each set (a fixed random subset) are used."""
    from prdc import compute_prdc

    generator = torch.Generator().manual_seed(seed)

    def subset(features):
        if len(features) <= max_n:
            return features
        return features[torch.randperm(len(features), generator=generator)[:max_n]]

    real, fake = subset(real_features.double()), subset(fake_features.double())
    scores = compute_prdc(real.numpy(), fake.numpy(), nearest_k=nearest_k)
    return {"precision": float(scores["precision"]), "recall": float(scores["recall"]),
            "density": float(scores["density"]), "coverage": float(scores["coverage"]), "nearest_k": nearest_k,
            "n_pr": min(len(real), len(fake))}


def clip_score(images: torch.Tensor, captions: list[str], model_path: str | None = None,
               device: str | torch.device = "cpu", batch_size: int = 64) -> float:
    """CLIP score (Hessel et al. 2021): 100 * mean max(cos(image embedding, caption embedding), 0), by torchmetrics
    with a local CLIP (``model_path``: a folder or a cached hub id; openai/clip-vit-large-patch14 by default)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from diffexp.metrics.features import to_uint8_rgb

    if len(captions) != len(images):
        raise ValueError(f"clip_score needs one caption per image, got {len(captions)} for {len(images)}")
    try:
        metric = CLIPScore(model_name_or_path=model_path or "openai/clip-vit-large-patch14").to(device)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"CLIP weights for clip_score not found ({type(e).__name__}): download "
                                f"openai/clip-vit-large-patch14 into the HF cache, or pass "
                                f"clip=FOLDER (python -m diffexp.evaluate)") from None
    for start in range(0, len(images), batch_size):
        metric.update(to_uint8_rgb(images[start:start + batch_size]).to(device), captions[start:start + batch_size])
    return float(metric.compute())
