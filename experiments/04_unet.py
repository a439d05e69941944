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
# # 4. The U-Net
#
# The denoiser $\epsilon_\theta(x_t, t[, \text{text}])$ is a U-Net (Ronneberger et al. 2015) as
# adapted by Ho et al. (2020) and Dhariwal & Nichol (2021): residual blocks at falling resolutions,
# self-attention at the lowest ones, and skip connections that hand each down-path output to the
# matching up-path block. The timestep enters *every* residual block (a sinusoidal embedding
# through an MLP, applied as scale and shift after a GroupNorm); text enters through
# cross-attention. Code: `diffexp/nets/unet.py` and `layers.py`; sizes: `conf/unet/{tiny,small,base}.yaml`.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from diffexp.course import notebook_settings, net_preset
from diffexp.nets.layers import timestep_embedding
from diffexp.viz.unet import layer_table_markdown, unet_diagram

net = net_preset("tiny", image_size=16, in_channels=1)
display(Markdown(layer_table_markdown(net)))

# %% [markdown]
# The table comes from a real forward pass (hooks record every block's output shape). "push" marks
# outputs saved for the up path, "pop" the blocks that concatenate one. The diagram draws the U:

# %%
_, _, FIGURES = notebook_settings()
fig = unet_diagram(net)
fig.savefig(FIGURES / "04_unet.png", dpi=70, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Where time enters: the sinusoidal embedding
# $\mathrm{emb}(t)_i = \cos(t\,\omega_i)$ for the first half of the channels, $\sin(t\,\omega_i)$ for the
# second, with $\omega_i = 10000^{-i/(d/2)}$: low channels oscillate fast, high channels slowly, so
# nearby timesteps get similar but distinguishable codes.

# %%
t = torch.arange(0, 1000)
emb = timestep_embedding(t, 64)
plt.figure(figsize=(8, 3))
plt.imshow(emb.T, aspect="auto", cmap="RdBu")
plt.xlabel("timestep t"), plt.ylabel("embedding channel")
plt.colorbar()
plt.show()

# %% [markdown]
# ## Sizes
# The presets, with and without cross-attention for a 64-wide text encoder:

# %%
for name in ["tiny", "small", "base"]:
    for ctx in (None, 64):
        n = sum(p.numel() for p in net_preset(name, 32, 3, ctx).parameters())
        print(f"{name:5s} context_dim={str(ctx):4s} {n / 1e6:6.2f} M parameters")

# %% [markdown]
# With a text encoder each attention block becomes a transformer block (self-attention,
# cross-attention to the caption tokens, feed-forward); the table shows where text enters:

# %%
display(Markdown(layer_table_markdown(net_preset("tiny", 16, 1, context_dim=64))))
