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
# # 3. The training loop, step by step
#
# DDPM training (Ho et al. 2020, Algorithm 1) is five lines:
#
# 1. take clean images $x_0$, 2. draw $t\sim U\{0..T-1\}$ and $\varepsilon\sim\mathcal N(0,I)$,
# 3. make $x_t=\sqrt{\bar\alpha_t}x_0+\sqrt{1-\bar\alpha_t}\varepsilon$,
# 4. predict $\hat\varepsilon=\epsilon_\theta(x_t,t)$, 5. descend on $\|\hat\varepsilon-\varepsilon\|^2$.
#
# We write it out with diffexp's pieces, then show that `DiffusionModel.loss` computes exactly
# the same number, and finally hand the loop to Lightning.

# %%
import lightning as L
import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F

from diffexp.course import notebook_settings
from diffexp.data import DigitsDataModule
from diffexp.lit import DiffusionModel
from diffexp.nets import UNet
from diffexp.paths import DiscretePath
from diffexp.schedules import get_schedule

FAST, _, FIGURES = notebook_settings()
torch.manual_seed(0)
data = DigitsDataModule(image_size=16, batch_size=64)
data.setup("fit")
schedule = get_schedule("linear", 1000)
path = DiscretePath(schedule)      # the forward process of this schedule (diffexp/paths.py)
alphas_cumprod = schedule.alphas_cumprod.float()
net = UNet(image_size=16, in_channels=1, base_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
           attention_resolutions=[], attention_levels=[-1], num_heads=1, dropout=0.0)
print(f"U-Net with {sum(p.numel() for p in net.parameters()):,} parameters")

# %% [markdown]
# ## One step, by hand

# %%
batch = next(iter(data.train_dataloader()))
x0 = batch["image"]                                           # 1. clean images in [-1, 1]
t = torch.randint(0, schedule.num_timesteps, (len(x0),))      # 2. random timesteps
eps = torch.randn_like(x0)                                    #    and noise
x_t = path.noised(x0, t, eps)                                 # 3. the forward jump
eps_hat = net(x_t, t)                                         # 4. the prediction
loss = F.mse_loss(eps_hat, eps)                               # 5. the objective
print("x0", tuple(x0.shape), "t[:8]", t[:8].tolist(), "loss", round(loss.item(), 4))

# %% [markdown]
# `path.noised` is nothing more than the formula:

# %%
abar = alphas_cumprod[t].view(-1, 1, 1, 1)
manual = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
print("max |path.noised - formula| =", (x_t - manual).abs().max().item())

# %% [markdown]
# ## A short training loop

# %%
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
losses = []
steps = 20 if FAST else 300
loader = iter(data.train_dataloader())
for step in range(steps):
    try:
        batch = next(loader)
    except StopIteration:
        loader = iter(data.train_dataloader())
        batch = next(loader)
    x0 = batch["image"]
    t = torch.randint(0, schedule.num_timesteps, (len(x0),))
    eps = torch.randn_like(x0)
    loss = F.mse_loss(net(path.noised(x0, t, eps), t), eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
plt.figure(figsize=(5, 3))
plt.plot(losses)
plt.xlabel("step"), plt.ylabel("MSE on epsilon")
plt.savefig(FIGURES / "03_training_loss.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The same thing in the LightningModule
# `DiffusionModel.loss` runs its objective (`diffexp/objectives.py`: a time density, a weighting and the prediction's
# target), which for DDPM draws t and noise the same way and computes the same MSE (other formulations swap the
# path, the target, the density or the weighting). With the same random state the numbers agree:

# %%
module = DiffusionModel(net, schedule, prediction_type="epsilon")
batch = next(iter(data.train_dataloader()))
torch.manual_seed(123)
by_module = module.loss(batch).item()
torch.manual_seed(123)
x0 = batch["image"]
t = torch.randint(0, schedule.num_timesteps, (len(x0),))
eps = torch.randn_like(x0)
by_hand = F.mse_loss(net(path.noised(x0, t, eps), t), eps).item()
print(f"module {by_module:.6f}  by hand {by_hand:.6f}")
assert abs(by_module - by_hand) < 1e-6

# %% [markdown]
# Lightning then owns the loop: devices, checkpoints, logging, validation. This is what
# `python train.py` builds from the config (`diffexp/train.py`), here by hand:

# %%
trainer = L.Trainer(max_steps=5 if FAST else 100, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
trainer.fit(module, datamodule=data)
samples = module.sample(16, progress=False, generator=torch.Generator().manual_seed(0))
print("samples", tuple(samples.shape), "in", (round(samples.min().item(), 2), round(samples.max().item(), 2)))
