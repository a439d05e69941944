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
# # 9. Editing images and teaching a model something new
#
# A trained diffusion model is more than a sampler from noise. Because its reverse process can start from
# *any* noise level, it can **edit**: noise an existing image part of the way and denoise it again (SDEdit,
# Meng et al. 2022); regenerate only a masked region while the rest stays (inpainting, RePaint, Lugmayr et al.
# 2022); walk between two samples (interpolation). And because it is a network like any other, it can be
# **fine-tuned** on a few new images — all of it (full fine-tuning) or through small low-rank adapters (LoRA,
# Hu et al. 2022) that leave the base weights untouched.
#
# This notebook uses the shapes text-to-image model, fully trained: `experiment=shapes_text2img`, 1,200 steps
# (18.5 min on 2 CPU cores the first time; the run is reused after). CI runs it with a 20-step model.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from diffexp.course import load, notebook_settings, pretrained_or_train, sampler as make_sampler, train
from diffexp.data.shapes import render
from diffexp.editing import edit, inpaint
from diffexp.finetune import load_adapter
from diffexp.metrics.adherence import caption_adherence
from diffexp.viz.images import show_image
from diffexp.viz.interpolation import interpolation_figure, interpolation_frames

FAST, RUNS, FIGURES = notebook_settings()
# the shipped shapes text model (DIFFEXP_NOTEBOOK_TRAIN=1: train one here, the full preset in course mode)
ckpt = pretrained_or_train("shapes_text", ["experiment=shapes_text2img"] + (["data.num_train=512"] if FAST else []),
                           RUNS / ("shapes_text" if FAST else "shapes_text_full"), steps=20 if FAST else None)
model, cfg = load(ckpt)
ddim = make_sampler(model, "ddim", steps=10 if FAST else 20)
guidance = 3.0

# %% [markdown]
# ## SDEdit: how much of the input survives
# `edit(model, images, strength)` (`diffexp/editing.py`) noises the input to the sampler's timestep at `strength` by
# $q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t) I)$ and runs the remaining steps.
# At strength 0 nothing happens; at 1 only $\sqrt{\bar\alpha_{t_0}}$ of the image is left (it is sampling).
# The input below is a crude painting — a blocky red patch with pixel noise — and the prompt asks for a circle.
# Low strength keeps the input (faithful, unrealistic); high strength gives a clean shape (realistic, less
# faithful). Two numbers measure the two sides: the mean squared distance to the input, and the pixel-level
# roughness (mean |x - its 3x3 local mean|), which for real data images is far below the painting's.

# %%
gen = torch.Generator().manual_seed(0)
painting = torch.full((3, 32, 32), -0.88)
painting[:, 7:23, 9:25] = torch.tensor([0.8, -0.7, -0.7]).view(3, 1, 1)
painting = (painting + 0.25 * torch.randn(painting.shape, generator=gen)).clamp(-1, 1)
prompt = "a large red circle in the center"
strengths = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
n_edits = 4 if FAST else 16
edits, faithful, rough = {}, [], []


def roughness(images):
    """Mean |x - 3x3 local mean|: pixel noise and jagged edges."""
    images = images.reshape(-1, *images.shape[-3:])
    return float((images - torch.nn.functional.avg_pool2d(images, 3, 1, 1, count_include_pad=False)).abs().mean())


real_roughness = roughness(torch.stack([render(c, s, "center", "large") for c in ("red", "blue", "green")
                                        for s in ("circle", "square", "triangle", "diamond")]))
for strength in strengths:
    out = edit(model, painting.expand(n_edits, -1, -1, -1), strength, ddim, generator=torch.Generator().manual_seed(1),
                     captions=[prompt] * n_edits, guidance_scale=guidance)
    edits[strength] = out
    faithful.append(float((out - painting).pow(2).mean()))
    rough.append(roughness(out))
fig, axes = plt.subplots(1, len(strengths) + 2, figsize=(2 * len(strengths) + 4, 2.2),
                         gridspec_kw={"width_ratios": [1] * (len(strengths) + 1) + [2.2]})
show_image(axes[0], painting)
axes[0].set_title("input", fontsize=9)
for ax, strength in zip(axes[1:], strengths):
    show_image(ax, edits[strength][0])
    ax.set_title(f"strength {strength}", fontsize=9)
ax = axes[-1]
ax.plot(strengths, faithful, "o-", label="MSE to the input")
ax.plot(strengths, rough, "s-", label="roughness")
ax.axhline(real_roughness, color="gray", ls="--", lw=1, label="roughness of real images")
ax.set_xlabel("strength")
ax.legend(fontsize=7)
fig.suptitle(f'SDEdit of a crude painting towards "{prompt}"', fontsize=10)
fig.tight_layout()
fig.savefig(FIGURES / "09_sdedit.png", dpi=80, bbox_inches="tight")
plt.show()
print(f"real images: roughness {real_roughness:.3f}")
for strength, mse, r in zip(strengths, faithful, rough):
    print(f"strength {strength:.1f}: MSE to the input {mse:.3f}, roughness {r:.3f}")

# %% [markdown]
# ## Inpainting: regenerate a region, keep the rest
# `inpaint(model, images, mask)` runs the reverse process and after every step replaces the known region
# (mask 0) by the input noised to that step's time, so the generated region must fit around it. At the end the
# known pixels are the input's exactly. RePaint's *resampling* (`jump_length`, `jump_n_sample`) goes back a few
# steps and denoises again, several times, which harmonises the boundary at the cost of more model calls.
# Here the red circle at the top left is replaced by a green diamond; the blue square elsewhere must stay.

# %%
scene = render("red", "circle", "top left", "large").clone()
scene[:, 20:, 20:] = render("blue", "square", "bottom right", "large")[:, 20:, 20:]
mask = torch.zeros(1, 1, 32, 32)
mask[..., :14, :14] = 1  # white = regenerate
request = "a large green diamond in the top left"
n_fill = 2 if FAST else 4
options = dict(captions=[request] * n_fill, guidance_scale=guidance)
plain = inpaint(model, scene.expand(n_fill, -1, -1, -1), mask, ddim, generator=torch.Generator().manual_seed(2),
                      **options)
resampled = inpaint(model, scene.expand(n_fill, -1, -1, -1), mask, ddim, generator=torch.Generator().manual_seed(2),
                          jump_length=2, jump_n_sample=3, **options)
known = (mask == 0).expand(n_fill, 3, -1, -1)
print("known pixels kept exactly:", bool((plain[known] == scene.expand(n_fill, -1, -1, -1)[known]).all()),
      "| model calls per image: blended", ddim.nfe(), "RePaint", ddim.nfe(0, 2, 3))
fig, axes = plt.subplots(2, n_fill + 2, figsize=(1.6 * (n_fill + 2), 3.4))
for row, (name, result) in enumerate((("blended", plain), ("RePaint 2 x 3", resampled))):
    show_image(axes[row, 0], scene)
    show_image(axes[row, 1], mask[0].expand(3, -1, -1) * 2 - 1)
    for i in range(n_fill):
        show_image(axes[row, i + 2], result[i])
    axes[row, 2].set_title(name, fontsize=9)
axes[0, 0].set_title("input", fontsize=9)
axes[0, 1].set_title("mask", fontsize=9)
fig.tight_layout()
fig.savefig(FIGURES / "09_inpainting.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Interpolation
# Spherical interpolation between two noises (Gaussian noise lives near a sphere; a straight line would pass
# through noise of too small a norm) and linear interpolation between two prompts' embeddings, each frame
# decoded by deterministic DDIM. The endpoints are exactly the two ordinary samples.

# %%
frames = interpolation_frames(model, frames=6 if FAST else 8, seed=0, seed_b=0, sampler=ddim, guidance_scale=guidance,
                              prompts=("a large red circle in the top left", "a large blue square in the bottom right"))
fig = interpolation_figure(frames, "prompt interpolation, same noise")
fig.savefig(FIGURES / "09_interpolation.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Teaching the model a new word: "star"
# The shapes data can draw a fifth shape, a star, that the model has never seen (`data.shapes=[star]`). The
# learned text encoder's vocabulary is *extended* — "star" gets a new id after the known words, whose ids stay —
# and the model is fine-tuned on 100 captioned star images, with images of the known shapes replayed so that
# they are not forgotten (`experiment=shapes_star_finetune`). With `model.lora.rank=16` only low-rank adapters
# train (here on the attention projections, the ResBlock convolutions and the word table); the run saves them
# alone as `adapter.safetensors`, and `sample.py ckpt=BASE lora=ADAPTER` puts them back on the base model.

# %%
ft_steps = 3 if FAST else 300
small = ["data.num_train=16", "data.replay=16", "data.num_val=8", "data.batch_size=8"] if FAST else []
lora_ckpt = train(["experiment=shapes_star_finetune", f"init_from={ckpt}", "model.lora.rank=16",
                   "model.optimizer.lr=2e-3"] + small, RUNS / "star_lora16", steps=ft_steps)
adapter = lora_ckpt.parent / "adapter.safetensors"
tuned, _ = load(ckpt)
load_adapter(tuned, adapter)
adapter_parameters = sum(v.numel() for v in tuned.adapter_state_dict().values() if torch.is_tensor(v))
print(f"adapter: {adapter.stat().st_size / 1024:.0f} KiB, {adapter_parameters:,} parameters; vocabulary "
      f"{len(model.conditioner.encoder.vocab)} -> {len(tuned.conditioner.encoder.vocab)} words")
star_prompts = ["a large red star in the center", "a large cyan star in the top left",
                "a small yellow star in the bottom right", "a large red blicket in the center"]
n_each = 2 if FAST else 4
captions = [p for p in star_prompts for _ in range(n_each)]
x_T = torch.randn(len(captions), *model.sample_shape, generator=torch.Generator().manual_seed(3))
before = model.sample(len(captions), sampler=ddim, x_T=x_T, captions=captions, guidance_scale=guidance)
after = tuned.sample(len(captions), sampler=ddim, x_T=x_T, captions=captions, guidance_scale=guidance)
fig, axes = plt.subplots(2, len(captions), figsize=(1.2 * len(captions), 3.0))
for col in range(len(captions)):
    show_image(axes[0, col], before[col])
    show_image(axes[1, col], after[col])
    if col % n_each == 0:
        axes[0, col].set_title(captions[col].replace("a ", "").replace(" in the", "\n"), fontsize=7)
axes[0, 0].set_ylabel("base", fontsize=9)
axes[1, 0].set_ylabel("+ LoRA r16", fontsize=9)
fig.tight_layout()
fig.savefig(FIGURES / "09_finetune_star.png", dpi=80, bbox_inches="tight")
plt.show()
stars = [c for c in captions if " star " in c]
for name, images in (("base", before), ("LoRA r16", after)):
    picked = torch.stack([img for img, c in zip(images, captions) if " star " in c])
    print(f"{name}: star-prompt adherence {caption_adherence(picked, stars)['adherence']:.0%} (n = {len(stars)})")

# %% [markdown]
# The last prompt is a control: "blicket" is a nonsense word. Both it and "star" were unknown words to the base
# model's tokenizer, and the fine-tuning data never shows an unknown word that is *not* a star — so the adapter
# may learn "an unfamiliar shape word means star". The measurements below show how often each method does.
#
# The measured comparison — full fine-tuning against LoRA
# rank 4 and 16, N = 200 prompts per set, with the control word and forgetting — comes from
# `python experiments/scripts/finetune_concept.py --base RUN/checkpoints/last.ckpt`:

# %%
results = Path("results/finetune_star.md")
print(results.read_text() if results.is_file() else "run experiments/scripts/finetune_concept.py to measure")
