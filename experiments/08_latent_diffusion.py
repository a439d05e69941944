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
# # 8. Latent diffusion
#
# Stable Diffusion does not denoise pixels. An autoencoder first compresses each image
# $x\in\mathbb R^{H\times W\times 3}$ into a latent $z\in\mathbb R^{H/f\times W/f\times c}$ (f = 8, c = 4
# for SD); the diffusion model works on z, and the decoder turns its samples into images
# (Rombach et al. 2022). Same equations, far fewer positions per image.
#
# Here: shapes at 32x32x3, an autoencoder with f = 4 and c = 4 (latents 8x8x4, 12x fewer numbers),
# trained in this notebook; then a diffusion model on its latents.

# %%
import matplotlib.pyplot as plt
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.image import peak_signal_noise_ratio

from diffexp.config import instantiate
from diffexp.course import load, notebook_settings, pretrained_or_train
from diffexp.autoencoders import load_autoencoder
from diffexp.checkpoints import CONFIG_KEY, read_checkpoint
from diffexp.samplers import DDIMSampler
from diffexp.viz.images import make_grid

FAST, RUNS, FIGURES = notebook_settings()
small_data = ["data.num_train=512", "data.num_val=64"] if FAST else ["data.num_train=4000"]

# %% [markdown]
# ## Step 1: the autoencoder
# A KL-regularised VAE: the encoder outputs a mean and log-variance per latent element; training
# minimises reconstruction error plus a *tiny* KL term (weight 1e-6) that keeps the latents
# bounded without blurring them. `python train.py experiment=shapes_vae` is the full version.

# %%
vae_steps = 20 if FAST else 400
# the shipped autoencoder (the shapes_vae preset's full run); DIFFEXP_NOTEBOOK_TRAIN=1 trains a short one here
vae_ckpt = pretrained_or_train("shapes_vae", ["experiment=shapes_vae"] + small_data, RUNS / "vae", steps=vae_steps)
vae = load_autoencoder(vae_ckpt)
data = instantiate(OmegaConf.create(read_checkpoint(vae_ckpt)[CONFIG_KEY]).data)
data.setup("fit")
x = torch.stack([data.val_set[i]["image"] for i in range(16)])
with torch.no_grad():
    posterior = vae.encode(x)
    recon = vae.decode(posterior.mode()).clamp(-1, 1)
psnr = peak_signal_noise_ratio(recon, x, data_range=2.0, reduction="none", dim=(1, 2, 3))
print(f"latent shape {tuple(posterior.mean.shape[1:])}, PSNR on held-out shapes {psnr.mean():.1f} dB")
plt.figure(figsize=(12, 2))
plt.imshow(make_grid(torch.cat([x, recon]), nrow=16))
plt.title("top: held-out images, bottom: reconstructions")
plt.axis("off")
plt.savefig(FIGURES / "08_reconstructions.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The latent scale factor
# Diffusion assumes data of roughly unit variance (the noise it adds is N(0, I)). Raw latents are
# not: LDM multiplies them by $1/\mathrm{std}$ of the training latents, estimated once (SD's
# published 0.18215 is exactly that number for its VAE). diffexp estimates it when latent training
# starts and stores it in the checkpoint (`space.latent_scale`), so sampling and resuming use the same value.

# %%
with torch.no_grad():
    raw = vae.encode(torch.stack([data.train_set[i]["image"] for i in range(256)])).mode()
scale = 1.0 / raw.flatten().std()
fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
axes[0].hist(raw.flatten().numpy(), bins=60), axes[0].set_title(f"raw latents (std {raw.std():.2f})")
axes[1].hist((raw * scale).flatten().numpy(), bins=60), axes[1].set_title("scaled by 1/std: unit variance")
plt.show()
print(f"scale factor 1/std = {scale:.4f}")

# %% [markdown]
# ## Step 2: diffusion on the latents
# `model=latent` is the same `DiffusionModel` with a latent space: an encode before the loss and a decode after sampling;
# schedules, samplers, the U-Net, EMA and callbacks are shared.

# %%
ldm_steps = 20 if FAST else 600
ldm_ckpt = pretrained_or_train("shapes_latent", ["experiment=shapes_latent", f"vae.ckpt={vae_ckpt}"] + small_data,
                               RUNS / "latent", steps=ldm_steps)
model, cfg = load(ldm_ckpt)
print("U-Net input", model.sample_shape, "stored scale", round(model.space.latent_scale.item(), 4))
sampler = DDIMSampler(model.path, steps=20, prediction_type=model.prediction_type, progress=False)
traj = model.sample(8, sampler=sampler, generator=torch.Generator().manual_seed(0), return_trajectory=True,
                    progress=False)
plt.figure(figsize=(10, 1.6))
plt.imshow(make_grid(traj.sample, nrow=8))
plt.title("latent diffusion samples, decoded")
plt.axis("off")
plt.show()

# %% [markdown]
# ## What it buys
# The U-Net sees 8x8x4 instead of 32x32x3 inputs. `experiments/bench/pixel_vs_latent.py` measures
# training and sampling speed and memory of both presets in one run; its figures are in the README.
