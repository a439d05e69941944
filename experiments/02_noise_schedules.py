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
# # 2. Noise schedules compared
#
# A schedule is the sequence $\beta_0..\beta_{T-1}$ (diffexp counts timesteps from 0); everything else follows:
# $\bar\alpha_t=\prod_s(1-\beta_s)$, the signal-to-noise ratio $\mathrm{SNR}(t)=\bar\alpha_t/(1-\bar\alpha_t)$,
# and the weight $\sqrt{\bar\alpha_t}$ of the clean image left in $x_t$.
# The code is `diffexp/schedules.py`; the config group is `schedule=linear|quadratic|cosine|sigmoid`.

# %%
import matplotlib.pyplot as plt
import torch

from diffexp.compare import read_metrics
from diffexp.course import data_of, load, notebook_settings, pretrained_or_train
from diffexp.metrics.evaluate import evaluate
from diffexp.samplers import DDIMSampler
from diffexp.api import draw_samples
from diffexp.viz.images import make_grid
from diffexp.viz.schedules import schedules_figure

FAST, RUNS, FIGURES = notebook_settings()

# %%
fig = schedules_figure(["linear", "quadratic", "cosine", "sigmoid"], zero_terminal_snr=["linear"])
fig.savefig(FIGURES / "02_schedules.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# Reading the curves: the linear schedule's log-SNR falls fastest: it crosses 0 near t = 260, is about -2.5
# at t = 500 (sqrt(abar) = 0.28), and stays below -5 for the last ~30 % of the steps (t >= 702), where the
# network has little to learn. Cosine keeps signal longer and spreads the log-SNR more evenly. None of the
# standard schedules reaches SNR = 0 at the last timestep t = T - 1:
# the *zero-terminal-SNR* rescaling (Lin et al. 2023, dashed) fixes that, so sampling from pure
# noise matches training.
#
# ## How the schedule changes training
# A sweep on the digits: the same U-Net, the same steps, only `schedule=` differs. This is
# what `python train.py -m formulation=ddpm schedule=linear,quadratic,cosine` runs from the command line (the
# quickstart's own formulation is flow matching, whose path has no `schedule=`). The three runs ship with
# diffexp (`diffexp.course.pretrained("digits")`, `"digits_quadratic"`, `"digits_cosine"`: the quickstart preset's
# full 1,100 steps, with their training curves); `DIFFEXP_NOTEBOOK_TRAIN=1` trains shorter ones here instead.

# %%
steps = 30 if FAST else 300
results = {}
for name in ["linear", "quadratic", "cosine"]:
    run_dir = RUNS / f"schedule_{name}"
    shipped = "digits" if name == "linear" else f"digits_{name}"
    ckpt = pretrained_or_train(shipped, ["experiment=quickstart", "formulation=ddpm", f"schedule={name}"], run_dir, steps=steps)
    model, cfg = load(ckpt)
    n = 64 if FAST else 256
    images = draw_samples(model, n, DDIMSampler(model.path, steps=20, prediction_type=model.prediction_type,
                                                progress=False), seed=0, batch_size=256, progress=False)
    scores = evaluate(["fid_digits", "digits_classifier"], images, data_of(cfg))
    curves = read_metrics(ckpt.parent if ckpt.suffix == ".safetensors" else run_dir)  # shipped: beside the weights
    results[name] = {"run": run_dir, "images": images, "losses": curves["train/loss"],
                     "fid_digits": scores["fid_digits"]["value"],
                     "recognised": scores["digits_classifier"]["confident_fraction"]}

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for name, r in results.items():
    steps_, losses = zip(*r["losses"])
    window = 10
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1) if len(losses) > window else torch.tensor(losses)
    axes[0].plot(steps_[len(steps_) - len(smooth):], smooth, label=name)
axes[0].set_xlabel("step"), axes[0].set_ylabel("train/loss (smoothed)"), axes[0].legend()
names = list(results)
axes[1].bar(names, [results[n]["fid_digits"] for n in names], color=["C0", "C1", "C2"])
axes[1].set_ylabel("fid_digits (lower is better)")
plt.tight_layout()
plt.show()
for name in names:
    print(f"{name:10s} fid_digits {results[name]['fid_digits']:.3f}  recognised {results[name]['recognised']:.1%}")

# %% [markdown]
# The losses are not comparable across schedules (each weights the timesteps differently); sample
# quality is. Samples from each run, same noise:

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
for ax, name in zip(axes, names):
    ax.imshow(make_grid(results[name]["images"][:36], nrow=6), cmap="gray")
    ax.set_title(f"{name}: fid_digits {results[name]['fid_digits']:.2f}")
    ax.axis("off")
plt.show()
