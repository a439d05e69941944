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
# # 5. Sampling: DDPM, DDIM, the score view and few-step ODE solvers
#
# A trained $\epsilon_\theta$ turns noise into images by running the process backwards.
# **DDPM** (Ho et al. 2020) takes all T = 1000 stochastic steps. **DDIM** (Song et al. 2021) uses the
# same network on a subsequence of 10-50 timesteps with a deterministic update (eta = 0). Both
# live in `diffexp/samplers/` and work for any model function and any prediction type.
#
# We use the digits model shipped with diffexp (`diffexp.course.pretrained("digits")`: the quickstart preset's
# full run, 1,100 steps); set `DIFFEXP_NOTEBOOK_TRAIN=1` to train your own here instead.

# %%
import time

import matplotlib.pyplot as plt
import torch

from diffexp.course import data_of, load, notebook_settings, pretrained_or_train, sampler as make_sampler
from diffexp.diffusion import to_x0_eps
from diffexp.metrics.evaluate import evaluate
from diffexp.api import draw_samples
from diffexp.samplers import DDIMSampler, DDPMSampler
from diffexp.viz.reverse import quality_vs_steps_figure, trajectories, trajectory_figure

FAST, RUNS, FIGURES = notebook_settings()
steps = 30 if FAST else 600
ckpt = pretrained_or_train("digits", ["experiment=quickstart", "formulation=ddpm"], RUNS / "digits", steps=steps)
model, cfg = load(ckpt)
kw = dict(prediction_type=model.prediction_type, progress=False)

# %% [markdown]
# ## DDPM vs DDIM from the same noise
# Top rows: $x_t$ along the way; bottom rows: the model's guess of $x_0$ at that step,
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$. The guess is blurry early
# (the mean of all digits that fit) and sharpens as t falls.

# %%
ddpm_steps = 20 if FAST else 1000
samplers = {f"DDPM-{ddpm_steps}": DDPMSampler(model.path, steps=ddpm_steps, **kw),
            "DDIM-50": DDIMSampler(model.path, steps=50, **kw)}
trajs = trajectories(model, samplers, n=2, seed=1)
fig = trajectory_figure(trajs, frames=8)
fig.savefig(FIGURES / "05_ddpm_vs_ddim.png", dpi=70, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The score-function view
# Tweedie's formula links the noise prediction to the score of the noised data:
# $\nabla_{x_t}\log p_t(x_t) = -\varepsilon(x_t, t)/\sqrt{1-\bar\alpha_t}$, i.e.
# $\varepsilon = -\sqrt{1-\bar\alpha_t}\,\nabla\log p_t$. Where the score is known we can check it:
# if the data are $x_0\sim\mathcal N(0, I)$ then $x_t\sim\mathcal N(0, I)$ for every t, the score is
# $-x_t$, and the optimal noise prediction is $\sqrt{1-\bar\alpha_t}\,x_t$.

# %%
schedule = model.schedule
abar = schedule.alphas_cumprod.float()
t = torch.tensor([100, 500, 900])
x_t = torch.randn(3, 1, 4, 4)
score = -x_t                                     # grad log N(x; 0, I)
eps_from_score = -(1 - abar[t]).sqrt().view(-1, 1, 1, 1) * score
# check against the posterior mean E[eps | x_t] estimated by Monte Carlo over x0 ~ N(0, I)
x0 = torch.randn(200_000, 3, 1, 1)
eps = torch.randn(200_000, 3, 1, 1)
samples = abar[t].sqrt().view(1, -1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(1, -1, 1, 1) * eps
# regression slope of eps on x_t per timestep = E[eps x_t] / E[x_t^2]
slope = (eps * samples).mean(0) / (samples**2).mean(0)
print("slope E[eps|x_t]/x_t, Monte Carlo:", slope.flatten().tolist())
print("sqrt(1 - abar_t), from the score:  ", (1 - abar[t]).sqrt().tolist())
alpha, sigma = model.path.coefficients(t, x_t)    # sqrt(abar_t), sqrt(1 - abar_t) on this DDPM path
x0_hat, eps_hat = to_x0_eps(eps_from_score, x_t, alpha, sigma, "epsilon")
print("x0_hat = E[x0|x_t] = sqrt(abar) x_t:", torch.allclose(x0_hat, abar[t].sqrt().view(-1, 1, 1, 1) * x_t, atol=1e-5))

# %% [markdown]
# ## The probability-flow ODE and few-step solvers
# Every marginal $p_t$ of the forward process is also reached by a deterministic path: in the variables
# $y = x_t/\sqrt{\bar\alpha_t}$ and $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$ the probability-flow ODE is
# simply $dy/d\sigma = \varepsilon_\theta(x_t, t)$ (Karras et al. 2022). **DDIM (eta = 0) is Euler's method on
# this ODE**: $y' = y + (\sigma'-\sigma)\,\hat\varepsilon = \hat x_0 + \sigma'\hat\varepsilon$. Euler is first order:
# its error shrinks only like 1/steps, which is why DDIM-10 looks worse than DDIM-50. Higher-order solvers reuse
# model outputs: **Heun** corrects each step with a second evaluation at its end (2 per step), **DPM-Solver++(2M)**
# (Lu et al. 2022) and **UniPC** (Zhao et al. 2023) extrapolate from the previous step's $\hat x_0$ (one
# evaluation per step), integrating the linear part exactly in $\lambda = \log(\alpha_t/\sigma_t)$.
# *Where* the steps go matters as much: Karras spacing ($\sigma^{1/7}$ uniform) puts more of them at low noise.

# %%
x_T = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
euler = make_sampler(model, "euler", steps=10, timestep_spacing="leading")
ddim10 = DDIMSampler(model.path, steps=10, **kw)
print("Euler on the ODE == DDIM:", torch.allclose(model.sample(2, sampler=euler, x_T=x_T),
                                                    model.sample(2, sampler=ddim10, x_T=x_T), atol=1e-5))
ode = {"DDIM-10": ddim10, "DPM-Solver++(2M)-10": make_sampler(model, "dpmpp_2m", steps=10),
       f"DDPM-{ddpm_steps}": DDPMSampler(model.path, steps=ddpm_steps, **kw)}
trajs = trajectories(model, ode, n=2, seed=1)
fig = trajectory_figure(trajs, frames=6)
fig.savefig(FIGURES / "05_ddim_dpm_ddpm.png", dpi=70, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Quality against the number of model evaluations
# `fid_digits` compares the samples' features (from the committed digits classifier) with the training
# set's. Every row starts from the same noise; NFE counts model evaluations (Heun: 2 per step, 1 on the last).

# %%
n = 32 if FAST else 256
rows = []
grid = (("ddim", [5, 10]), ("dpmpp_2m", [5, 10]), ("ddpm", [20])) if FAST else (
    ("ddim", [5, 10, 20, 50]), ("dpmpp_2m", [5, 10, 20]), ("unipc", [5, 10, 20]), ("heun", [3, 5, 10]),
    ("ddpm", [100]))  # DDPM-1000 is in the measured figure below
reference = data_of(cfg)
for sampler_name, steps_list in grid:
    for s in steps_list:
        sampler = make_sampler(model, sampler_name, steps=s)
        start = time.perf_counter()
        images = draw_samples(model, n, sampler, seed=0, batch_size=500, progress=False)
        seconds = time.perf_counter() - start
        fid = evaluate(["fid_digits"], images, reference)["fid_digits"]["value"]
        rows.append({"sampler": sampler_name, "nfe": sampler.nfe(), "fid_digits": fid, "seconds": seconds})
        print(f"{sampler_name:9s} NFE {sampler.nfe():4d}: fid_digits {fid:.3f}  {seconds:.1f} s for {n} images")
fig = quality_vs_steps_figure(rows, "fid_digits", x="nfe")
plt.show()

# %% [markdown]
# The same comparison on the full quickstart model with N = 1,000 (README, `experiments/results/quickstart_solvers.*`,
# made by `experiments/scripts/evaluate_samplers.py --nfe ...`): the dashed lines are DDIM-1000 (the ODE's
# converged result) and DDPM-1000.

# %%
from PIL import Image

from diffexp.config import CONF_DIR

measured = CONF_DIR.parent / "experiments" / "results" / "quickstart_solvers.png"
if measured.is_file():
    plt.figure(figsize=(7, 4.5))
    plt.imshow(Image.open(measured))
    plt.axis("off")
    plt.show()
