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
# # 1. The forward process
#
# Diffusion models learn to undo a fixed corruption. The forward process adds Gaussian noise in
# T small steps; thanks to Gaussian algebra any step can be reached in one jump:
#
# $$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad \varepsilon\sim\mathcal N(0, I),
# \qquad \bar\alpha_t = \prod_{s\le t}(1-\beta_s).$$
#
# This is `diffexp.paths.DiscretePath.noised`, the forward process training uses. Here we watch it on a
# real image (a handwritten digit from scikit-learn's bundled set).
#
# Set `DIFFEXP_NOTEBOOK_MODE=ci` for the quick settings CI uses.

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

from diffexp.course import notebook_settings
from diffexp.data.digits import load_digits_tensor
from diffexp.schedules import get_schedule
from diffexp.viz.animation import save_animation
from diffexp.viz.forward import forward_animation_frames, forward_grid_figure, histogram_figure, noised

FAST, _, FIGURES = notebook_settings()
images, labels = load_digits_tensor(32)
x0 = images[0]
print("image", tuple(x0.shape), "label", int(labels[0]), "values in", (x0.min().item(), x0.max().item()))

# %% [markdown]
# ## x_t along t, for two schedules
# The same noise draw is used at every t, so the frames differ only in how much signal is left.
# The linear schedule (Ho et al. 2020) destroys the image much earlier than the cosine one
# (Nichol & Dhariwal 2021).

# %%
fig = forward_grid_figure(x0, ["linear", "cosine"], timesteps=(0, 50, 100, 200, 300, 500, 700, 999))
plt.show()

# %% [markdown]
# ## The pixel histogram drifts to N(0, 1)
# At t = 0 the digit's pixels sit near -1 (background) and +1 (ink); by the end they are
# indistinguishable from standard normal noise: $\bar\alpha_{T-1}\approx 0$.

# %%
fig = histogram_figure(x0, "linear", timesteps=(0, 50, 200, 500, 999))
plt.show()
last = noised(torch.zeros(1, 64, 64), "linear", [999])[0]
print(f"x_T of a blank image: mean {last.mean():.3f}, std {last.std():.3f} (N(0,1): 0, 1)")

# %% [markdown]
# ## As an animation
# Left: linear, middle: quadratic, right: cosine; t runs from 0 to 999.

# %%
frames = forward_animation_frames(x0, ["linear", "quadratic", "cosine"], num_frames=12 if FAST else 30, scale=3)
path = save_animation(frames, FIGURES / "01_forward_process.gif", fps=8)
display(Image(filename=str(path)))

# %% [markdown]
# ## Try it live
# With `ipywidgets` installed, the sliders below redraw x_t for any schedule and t.

# %%
def show(schedule="cosine", t=250):
    frame = noised(x0, get_schedule(schedule), [t])[0]
    plt.figure(figsize=(2.5, 2.5))
    plt.imshow(((frame[0] + 1) / 2).clamp(0, 1), cmap="gray")
    abar = get_schedule(schedule).alphas_cumprod[t].item()
    plt.title(f"{schedule}, t={t}, abar={abar:.3f}", fontsize=9)
    plt.axis("off")
    plt.show()


try:
    from ipywidgets import IntSlider, interact

    interact(show, schedule=["linear", "quadratic", "cosine", "sigmoid"], t=IntSlider(250, 0, 999, 1))
except ImportError:
    show("cosine", 250)
