# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. Evaluation: FID, KID, IS, LPIPS
#
# | metric | compares | reads |
# |---|---|---|
# | **FID** (Heusel et al. 2017) | Gaussian fits of real and generated features | $\|\mu_r-\mu_g\|^2 + \mathrm{Tr}(\Sigma_r+\Sigma_g-2(\Sigma_r\Sigma_g)^{1/2})$, lower is better |
# | **KID** (Binkowski et al. 2018) | the same features, kernel MMD (cubic polynomial kernel) | unbiased, lower is better |
# | **IS** (Salimans et al. 2016) | generated images only: classifier confidence and class spread | $\exp E[KL(p(y|x)\|p(y))]$, higher is better |
# | **LPIPS** (Zhang et al. 2018) | two images in a deep feature space | perceptual distance; over sample pairs it measures diversity |
#
# Standard FID/KID/IS use Inception-v3 features (torch-fidelity; weights from the hub cache).
# Offline, diffexp computes the same formulas on the features of a small classifier trained on
# the dataset itself (`fid_digits`, `kid_digits`): comparable within this project, not with papers.

# %%
import matplotlib.pyplot as plt
import torch

from diffexp.course import notebook_settings
from diffexp.data import DigitsDataModule
from diffexp.metrics.domain import load_domain_classifier
from diffexp.metrics.features import extract_features
from diffexp.metrics.scores import classifier_report, frechet_distance, inception_score, kernel_distance

FAST, _, FIGURES = notebook_settings()
data = DigitsDataModule(image_size=16)
data.setup("fit")
real = torch.stack([data.train_set[i]["image"] for i in range(len(data.train_set))])
held_out = torch.stack([data.val_set[i]["image"] for i in range(len(data.val_set))])
classifier = load_domain_classifier("digits")
real_features = extract_features(classifier, real)
print("real images", tuple(real.shape), "features", tuple(real_features.shape))

# %% [markdown]
# ## The metrics respond to corruption
# Held-out real digits with growing Gaussian noise, against the training set:

# %%
levels = [0.0, 0.1, 0.2, 0.4, 0.8]
fids, kids = [], []
generator = torch.Generator().manual_seed(0)
for sigma in levels:
    noisy = (held_out + sigma * torch.randn(held_out.shape, generator=generator)).clamp(-1, 1)
    fake = extract_features(classifier, noisy)
    fids.append(frechet_distance(real_features, fake))
    kids.append(kernel_distance(real_features, fake, subsets=20 if FAST else 100)[0])
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(levels, fids, marker="o"), axes[0].set_title("fid_digits"), axes[0].set_xlabel("noise sigma")
axes[1].plot(levels, kids, marker="o"), axes[1].set_title("kid_digits"), axes[1].set_xlabel("noise sigma")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## FID is biased by the sample count
# FID estimates covariances from N samples; with small N the estimate is noisy and FID is biased
# *upwards*, even between two sets of real images. KID's estimator is unbiased: its mean stays
# near zero. Always compare FIDs at the same N (diffexp logs `n` with every metric).

# %%
sizes = [25, 50, 100, 200, 300] if FAST else [25, 50, 100, 200, 400, 800]
fid_by_n, kid_by_n = [], []
for n in sizes:
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(n))[:n]
    fake = real_features[idx]
    fid_by_n.append(frechet_distance(real_features, fake))
    kid_by_n.append(kernel_distance(real_features, fake, subsets=20, subset_size=min(n, 100))[0])
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(sizes, fid_by_n, marker="o", label="FID (real subset vs all real)")
ax.plot(sizes, [k * 100 for k in kid_by_n], marker="s", label="KID x 100")
ax.axhline(0, color="gray", lw=0.5)
ax.set_xscale("log"), ax.set_xlabel("N samples"), ax.legend()
fig.savefig(FIGURES / "07_fid_bias.png", dpi=80, bbox_inches="tight")
plt.show()
for n, f in zip(sizes, fid_by_n):
    print(f"N={n:4d}: FID of real vs real = {f:.3f}")

# %% [markdown]
# ## Inception Score, with the classifier in Inception's place
# IS rewards confident predictions (sharp p(y|x)) that cover many classes (broad p(y)). With 10
# classes it is at most 10. Real digits score near the maximum; blurred digits lose confidence.

# %%
def logits_of(images):
    with torch.no_grad():
        return torch.cat([classifier(chunk) for chunk in images.split(512)])


blurred = torch.nn.functional.avg_pool2d(held_out, 3, stride=1, padding=1)
for name, images in (("real", held_out), ("blurred", blurred), ("noise", torch.rand_like(held_out) * 2 - 1)):
    mean, std = inception_score(logits_of(images), splits=5)
    report = classifier_report(classifier, images)
    print(f"{name:8s} IS {mean:5.2f} ± {std:.2f}   confident {report['confident_fraction']:.0%}   "
          f"classes {report['classes_present']}")

# %% [markdown]
# ## LPIPS
# LPIPS needs AlexNet/VGG weights from torchvision's cache. With them, `metrics=[lpips_diversity]`
# in `sample.py` reports the mean LPIPS between random pairs of samples (higher = more diverse).
# Without them diffexp says which file to fetch:

# %%
from diffexp.metrics.scores import lpips_model  # noqa: E402

try:
    lpips_model()
    print("LPIPS weights found")
except FileNotFoundError as e:
    print("offline:", str(e)[:160], "...")
