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
# # 10. One design space: DDPM, EDM and flow matching
#
# DDPM (Ho et al. 2020), EDM (Karras et al. 2022) and flow matching / rectified flow (Lipman et al. 2023; Liu et
# al. 2023; SD3, Esser et al. 2024) look like three methods. They are one: each corrupts data along a **Gaussian
# path**
#
# $$x_t = \alpha(t)\,x_0 + \sigma(t)\,\varepsilon, \qquad \varepsilon \sim \mathcal N(0, I),$$
#
# and then makes four more choices: what the net predicts, how training draws $t$, how the loss is weighted, and
# how a sampler steps back. Kingma et al. (2021) showed that a path matters only through its log-SNR
# $\lambda(t) = \log \alpha^2 / \sigma^2$; Kingma & Gao (2023) that the prediction, density and weighting together
# are one weighting of the same denoising loss over $\lambda$. In diffexp `formulation=ddpm|edm|flow|vp` sets the
# five pieces at once, and each stays its own config group (`path=`, `model.prediction_type=`, `density=`,
# `weighting=`, `sampler=`).
#
# This notebook puts the paths side by side, derives the conversions every sampler relies on (and checks them on
# tensors), follows the probability-flow ODE of each path from the same noise, and reads the formulation sweep:
# four digits models trained with the same budget, scored against the number of network evaluations.

# %%
import json
from itertools import pairwise
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from diffexp.course import load, notebook_settings, pretrained_or_train
from diffexp.course import sampler as make_sampler
from diffexp.data.digits import DigitsDataModule
from diffexp.diffusion import get_prediction, to_x0_eps
from diffexp.images import make_grid
from diffexp.objectives import DENSITIES
from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath, time_at_fraction
from diffexp.schedules import get_schedule, karras_sigmas

FAST, RUNS, FIGURES = notebook_settings()
torch.manual_seed(0)
PATHS = {"DDPM linear": DiscretePath(get_schedule("linear", 1000, 1e-4, 0.02)),
         "VP cosine": CosinePath(),
         "EDM (VE)": EDMPath(),
         "flow": FlowPath()}
COLORS = dict(zip(PATHS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
for name, path in PATHS.items():
    print(f"{name:12s} t in [{path.t_min:g}, {path.t_max:g}], clean at t = {path.clean_time:g}: {path!r}")

# %% [markdown]
# ## The paths side by side
# Each path runs on its own clock: DDPM's integer $t \in [0, 999]$, the cosine and flow paths' $t \in [0, 1]$, EDM's
# $t = \sigma \in [0.002, 80]$. To put them on one axis we use the fraction of the way from clean to noise a sampler
# covers in equal steps of that clock (for EDM along Karras' $\rho = 7$ grid, the spacing its sampler uses).
#
# - DDPM (linear $\beta$): $\alpha = \sqrt{\bar\alpha_t}$, $\sigma = \sqrt{1 - \bar\alpha_t}$ with
#   $\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$; variance preserving, $\alpha^2 + \sigma^2 = 1$.
# - VP cosine (Nichol & Dhariwal 2021, in continuous time): $\alpha^2 = f(t)/f(0)$,
#   $f(t) = \cos^2\!\big(\tfrac{t + s}{1 + s}\tfrac{\pi}{2}\big)$, $s = 0.008$.
# - EDM: $\alpha = 1$, $\sigma = t$ (variance exploding), $\sigma_{max} = 80$, $\sigma_{min} = 0.002$.
# - flow: $\alpha = 1 - t$, $\sigma = t$: a straight line from $x_0$ to $\varepsilon$; neither variance preserving
#   ($\alpha^2 + \sigma^2 = 1 - 2t + 2t^2 < 1$ inside) nor exploding.

# %%
u = torch.linspace(0, 1, 401, dtype=torch.float64)


def clock(path, fractions):
    """The path's times at ``fractions`` of the way from clean to noise (diffexp.paths.time_at_fraction: Karras'
    rho = 7 ramp on EDM's path, equal steps of t elsewhere)."""
    return torch.tensor([time_at_fraction(path, f) for f in fractions.tolist()], dtype=torch.float64)


fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for name, path in PATHS.items():
    t = clock(path, u)
    alpha, sigma = path.coefficients(t, torch.zeros(len(t), dtype=torch.float64))
    axes[0].plot(u, alpha, color=COLORS[name], label=f"{name}: alpha")
    axes[0].plot(u, sigma, color=COLORS[name], ls="--")
    axes[1].plot(u, path.log_snr(t), color=COLORS[name], label=name)
axes[0].set_yscale("log")
axes[0].set_ylim(1e-3, 100)
axes[0].set_title("alpha (solid) and sigma (dashed)")
axes[1].set_title("log-SNR lambda = log alpha^2 / sigma^2")
for ax in axes[:2]:
    ax.set_xlabel("fraction of the way from clean to noise (the sampler's clock)")
axes[0].legend(fontsize=8)

# what training sees: the log-SNR of the times each formulation's density draws
densities = {"DDPM linear": ("uniform_timesteps", {}), "VP cosine": ("uniform", {}),
             "EDM (VE)": ("log_normal", {}), "flow": ("uniform", {})}
bins = np.linspace(-20, 20, 81)
generator = torch.Generator().manual_seed(0)
for name, (density, options) in densities.items():
    path = PATHS[name]
    t = DENSITIES[density](**options).sample(200_000, path, generator, "cpu")
    lam = path.log_snr(t).clamp(-20, 20)
    axes[2].hist(lam.numpy(), bins=bins, histtype="step", density=True, color=COLORS[name], lw=1.5,
                 label=f"{name}: t ~ {density}")
axes[2].set_xlabel("log-SNR lambda of the training times")
axes[2].set_title("where training draws its times (weightings not shown)")
axes[2].legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "10_paths.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# The cosine and flow paths fall almost linearly in log-SNR over the middle of their clocks; the linear DDPM
# schedule leaves the clean end fast (log-SNR 9 to 0 within the first 26 % of its steps) and spends its last
# ~30 % below -5, near pure noise (notebook 2). EDM's $\sigma$ reaches a log-SNR
# of $-2\ln 80 \approx -8.8$ and its log-normal density centres training at $\ln\sigma = -1.2$
# ($\lambda = 2.4$); the flow path's uniform $t$ puts most samples at moderate $\lambda$ too ($\lambda = 0$ at
# $t = \tfrac12$).
#
# ## The same $x_0$ along each path
# One digit, one $\varepsilon$, noised along every path at the same fractions of its clock. The paths differ in
# scale (EDM's $x_t$ grows to $\sigma = 80$; each image is shown on its own grey scale), but at equal
# log-SNR they carry the same information: $x_t / \alpha = x_0 + (\sigma / \alpha)\,\varepsilon$ depends on the path
# only through $\sigma / \alpha = e^{-\lambda/2}$. The cell checks that on tensors.

# %%
digits = DigitsDataModule(batch_size=8, image_size=16)
digits.setup("fit")
x0 = digits.train_dataloader().dataset[0]["image"][None].double()
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
fractions = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0], dtype=torch.float64)
fig, axes = plt.subplots(len(PATHS), len(fractions), figsize=(1.6 * len(fractions), 1.8 * len(PATHS)))
for row, (name, path) in enumerate(PATHS.items()):
    for col, t in enumerate(clock(path, fractions)):
        x_t = path.noised(x0, t.item() if col else path.clean_time, eps)
        axes[row, col].imshow(x_t[0, 0], cmap="gray")
        axes[row, col].set_title(f"lambda {path.log_snr(t[None]).item():.1f}" if col else "x0", fontsize=8)
        axes[row, col].axis("off")
    axes[row, 0].text(-3, 8, name, rotation=90, va="center", ha="right", fontsize=9)
fig.tight_layout()
fig.savefig(FIGURES / "10_same_x0.png", dpi=80, bbox_inches="tight")
plt.show()

# at one log-SNR, x_t / alpha is the same image on every path
lam = torch.tensor([0.0, 3.0, -4.0], dtype=torch.float64)
for value in lam:
    scaled = []
    for path in PATHS.values():
        t = path.time_at_log_snr(value[None]).item()
        alpha, _ = path.alpha_sigma(t)
        scaled.append(path.noised(x0, t, eps) / alpha)
    spread = max((s - scaled[0]).abs().max().item() for s in scaled)
    print(f"lambda = {value.item():+.0f}: max |x_t/alpha - (x_t/alpha of DDPM)| over the paths = {spread:.1e}")

# %% [markdown]
# ## One denoiser, four parameterisations
# Every sampler in diffexp reads the net through one conversion, to the pair $(\hat x_0, \hat\varepsilon)$
# (`diffexp.diffusion.to_x0_eps`). From $x_t = \alpha x_0 + \sigma\varepsilon$:
#
# - **$\varepsilon$-prediction** (DDPM): $\hat x_0 = (x_t - \sigma\hat\varepsilon)/\alpha$.
# - **$v$-prediction** (Salimans & Ho 2022), $v = \alpha\varepsilon - \sigma x_0$: then
#   $\alpha x_t - \sigma v = (\alpha^2 + \sigma^2)\,x_0$ and $\sigma x_t + \alpha v = (\alpha^2 + \sigma^2)\,\varepsilon$,
#   so on a variance-preserving path $\hat x_0 = \alpha x_t - \sigma\hat v$, $\hat\varepsilon = \sigma x_t + \alpha\hat v$.
# - **velocity** (flow matching): $u = \varepsilon - x_0$, the time derivative $dx_t/dt$ of the flow path
#   $x_t = (1 - t)\,x_0 + t\,\varepsilon$ (diffexp uses this target on any path). For any $\alpha, \sigma$,
#   $x_t - \sigma u = (\alpha + \sigma)\,x_0$ and $x_t + \alpha u = (\alpha + \sigma)\,\varepsilon$, so
#   $\hat x_0 = (x_t - \sigma\hat u)/(\alpha + \sigma)$, $\hat\varepsilon = (x_t + \alpha\hat u)/(\alpha + \sigma)$;
#   on the flow path $\alpha + \sigma = 1$ and $\hat x_0 = x_t - t\,\hat u$.
# - **EDM's preconditioning** (Karras et al. 2022, Table 1 and eq. 7), on $\tilde x = x_t/\alpha$ with
#   $\tilde\sigma = \sigma/\alpha$: $D(\tilde x) = c_{skip}\,\tilde x + c_{out}\,F_\theta(c_{in}\,\tilde x, c_{noise})$ with
#   $c_{in} = 1/\sqrt{\tilde\sigma^2 + \sigma_d^2}$, $c_{skip} = \sigma_d^2/(\tilde\sigma^2 + \sigma_d^2)$,
#   $c_{out} = \tilde\sigma\sigma_d/\sqrt{\tilde\sigma^2 + \sigma_d^2}$, $c_{noise} = \tfrac14\ln\tilde\sigma$. The net's
#   input has unit variance, and its target $F = (x_0 - c_{skip}\tilde x)/c_{out}$ too, when the data have std
#   $\sigma_d$: $\mathrm{Var}(x_0 - c_{skip}\tilde x) = (1 - c_{skip})^2\sigma_d^2 + c_{skip}^2\tilde\sigma^2 = c_{out}^2$.
#
# The cell checks each: the target built from known $(x_0, \varepsilon)$, converted back, must return them; the
# velocity must be the finite-difference derivative of the path; EDM's input and target must have unit variance.

# %%
x0_test = 0.5 * torch.randn(4096, 16, dtype=torch.float64)  # data of std sigma_d = 0.5
eps_test = torch.randn(4096, 16, dtype=torch.float64)
for name, path, kind in [("DDPM linear", PATHS["DDPM linear"], "epsilon"), ("VP cosine", PATHS["VP cosine"], "v_prediction"),
                         ("flow", PATHS["flow"], "velocity"), ("EDM (VE)", PATHS["EDM (VE)"], "edm")]:
    prediction = get_prediction(kind, sigma_data=0.5)
    worst = 0.0
    for t in clock(path, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)):
        alpha, sigma = path.alpha_sigma(t.item())
        x_t = alpha * x0_test + sigma * eps_test
        raw = prediction.target(x0_test, eps_test, x_t, alpha, sigma)  # what the net learns to output
        back = to_x0_eps(prediction.output(raw, x_t, alpha, sigma), x_t, alpha, sigma, prediction.sampler_type,
                         path.variance_preserving)
        worst = max(worst, (back[0] - x0_test).abs().max().item(), (back[1] - eps_test).abs().max().item())
    print(f"{name:12s} {kind:13s}: target -> (x0, eps) recovers both to {worst:.1e}")

flow, t, h = PATHS["flow"], 0.3, 1e-6
derivative = (flow.noised(x0_test, t + h, eps_test) - flow.noised(x0_test, t - h, eps_test)) / (2 * h)
print("flow: velocity target eps - x0 vs the path's finite-difference derivative:",
      f"{(derivative - (eps_test - x0_test)).abs().max().item():.1e}")

edm, prediction = PATHS["EDM (VE)"], get_prediction("edm", sigma_data=0.5)
print("EDM, sigma: std of the net input c_in x, std of the target F")
for s in [0.002, 0.1, 0.5, 2.0, 80.0]:
    x_t = x0_test + s * eps_test
    net_in = prediction.net_input(x_t, 1.0, s)
    target = prediction.target(x0_test, eps_test, x_t, 1.0, s)
    print(f"  {s:6g}: {net_in.std().item():.3f}  {target.std().item():.3f}")

# %% [markdown]
# ## Straight paths: which ones?
# "Flow matching has straight paths" is a statement about the **conditional** paths: one data point $x_0$ and one
# noise $\varepsilon$ joined by $x_t = (1 - t)\,x_0 + t\,\varepsilon$, a segment (Lipman et al. 2023, their Figure 3).
# EDM's $x_0 + \sigma\varepsilon$ is a ray, also straight; a variance-preserving path
# $\alpha x_0 + \sigma\varepsilon$ with $\alpha^2 + \sigma^2 = 1$ is an arc. Measured as the excess length
# (arc length / chord length - 1, zero for a straight line) of the path of one image and one noise:

# %%


def excess_length(curve):
    """Arc length / chord length - 1 of each curve (points, ..., d): 0 for a straight line."""
    arc = (curve[1:] - curve[:-1]).norm(dim=-1).sum(0)
    chord = (curve[-1] - curve[0]).norm(dim=-1)
    return arc / chord - 1


for name, path in PATHS.items():
    times = clock(path, torch.linspace(0, 1, 1001, dtype=torch.float64))
    xs = torch.stack([path.noised(x0.flatten(), t, eps.flatten()) for t in times.tolist()])
    print(f"{name:12s} conditional path of one (x0, eps): excess length {excess_length(xs).item():.4f}")

# %% [markdown]
# ## The probability-flow ODE: one curve in four coordinates
# A sampler does not follow a conditional path: it follows the probability-flow ODE (Song et al. 2021), the
# deterministic map that carries the noise distribution to the data distribution. Written with the denoiser
# $\hat x_0(x_t, t)$, one step of DDIM (eta = 0) from $t$ to $s$ is
#
# $$x_s = \alpha_s\,\hat x_0 + \sigma_s\,\hat\varepsilon, \qquad \hat\varepsilon = (x_t - \alpha_t\hat x_0)/\sigma_t .$$
#
# Divide by $\alpha$: $\tilde x = x/\alpha$ moves along $\tilde\sigma = \sigma/\alpha$ as
# $\tilde x_s = \tilde x_t + (\tilde\sigma_s - \tilde\sigma_t)\,\hat\varepsilon$, Euler's method on EDM's ODE
# $d\tilde x/d\tilde\sigma = \hat\varepsilon$. Divide by $\alpha + \sigma$ instead: $y = x/(\alpha + \sigma)$ at
# $u = \sigma/(\alpha + \sigma)$ satisfies $y = (1 - u)\,\hat x_0 + u\,\hat\varepsilon$, and the same DDIM step is
# Euler's method on the flow ODE $dy/du = \hat\varepsilon - \hat x_0$. And $\hat x_0$ depends on the path only
# through the log-SNR (previous section). So **the paths share one ODE**, seen in different coordinates and run on
# different clocks, and DDIM is the same first-order solver on all of them.
#
# Where the data are a few points the exact denoiser is known: $\hat x_0(x_t) = \sum_i w_i\,a_i$ with
# $w \propto \exp(-\lVert x_t - \alpha a_i\rVert^2 / 2\sigma^2)$. Below, two-dimensional "data" of five points,
# the ODE solved on each path with 2,000 DDIM steps equally spaced in log-SNR, from the same noise (started at
# EDM's $\sigma_{max} = 80$, log-SNR -8.8) to log-SNR 9, drawn in each path's own coordinates $x_t$ and then mapped
# to the flow coordinates $y$, where they must coincide.

# %%
points = torch.tensor([[1.0, 0.0], [0.31, 0.95], [-0.81, 0.59], [-0.81, -0.59], [0.31, -0.95]], dtype=torch.float64)
LAM_START, LAM_END = -2 * np.log(80.0), 9.0


def exact_x0(x, alpha, sigma):
    """E[x0 | x_t] for data uniform on ``points``."""
    logits = -((x[:, None, :] - alpha * points[None]) ** 2).sum(-1) / (2 * sigma**2)
    return torch.softmax(logits, dim=1) @ points


def ddim(path, y_start, times):
    """DDIM (eta = 0) with the exact denoiser through ``times`` (descending), from x = (alpha + sigma) y_start;
    returns the x at every time."""
    alpha, sigma = path.alpha_sigma(times[0])
    x, xs = (alpha + sigma) * y_start, []
    for t, s in pairwise(times):
        xs.append(x)
        alpha, sigma = path.alpha_sigma(t)
        x0 = exact_x0(x, alpha, sigma)
        eps = (x - alpha * x0) / sigma
        alpha_s, sigma_s = path.alpha_sigma(s)
        x = alpha_s * x0 + sigma_s * eps
    xs.append(x)
    return torch.stack(xs)


def in_flow_coordinates(path, times, xs):
    return xs / torch.tensor([sum(path.alpha_sigma(t)) for t in times], dtype=torch.float64)[:, None, None]


def log_snr_grid(path, steps):
    return path.time_at_log_snr(torch.linspace(LAM_START, LAM_END, steps + 1, dtype=torch.float64)).tolist()


y_start = torch.randn(12, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
fig, axes = plt.subplots(1, len(PATHS) + 1, figsize=(3.3 * (len(PATHS) + 1), 3.4))
flow_curves, bends = {}, {}
for ax, (name, path) in zip(axes, PATHS.items()):
    times = log_snr_grid(path, 2000)
    xs = ddim(path, y_start, times)
    flow_curves[name], bends[name] = in_flow_coordinates(path, times, xs), excess_length(xs)
    for i in range(len(y_start)):
        ax.plot(*xs[:, i].T, lw=1)
    ax.scatter(*points.T, c="k", s=12, zorder=3)
    ax.set_title(f"{name}: own coordinates x_t\nexcess length {bends[name].mean():.3f}", fontsize=9)
    if name == "EDM (VE)":
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
for i in range(len(y_start)):
    axes[-1].plot(*flow_curves["flow"][:, i].T, lw=3, color="0.75")
    axes[-1].plot(*flow_curves["VP cosine"][:, i].T, lw=1, ls="--", color="tab:orange")
axes[-1].scatter(*points.T, c="k", s=12, zorder=3)
axes[-1].set_title("in flow coordinates y = x/(alpha+sigma):\nflow (grey) and VP cosine (dashed)", fontsize=9)
fig.tight_layout()
fig.savefig(FIGURES / "10_one_ode.png", dpi=80, bbox_inches="tight")
plt.show()
reference = flow_curves["flow"]
for name, curve in flow_curves.items():
    print(f"{name:12s} excess length in its own coordinates {bends[name].mean():.3f}, in flow coordinates "
          f"{excess_length(curve).mean():.3f}; max distance to the flow path's curve {(curve - reference).abs().max():.1e}")

# %% [markdown]
# The four curves are one curve to rounding error. How straight it looks depends on the coordinates, and the
# conditional paths' ranking does not carry over: while the noise dominates, $\hat x_0$ is close to the data mean,
# so in flow coordinates the trajectory first heads towards the middle of the data and turns towards one point
# only late, a longer detour than the variance-preserving picture, which keeps $x_t$ at its norm. (EDM's number is
# small because its chord, from $80\,\varepsilon$, is long.)
#
# ## What the path changes for a sampler: where the steps go
# If DDIM is the same solver on every path, a few-step DDIM run differs between formulations only through its time
# grid. The cell runs 5 and 10 DDIM steps from the same noises on each path (a) on one grid, equally spaced in
# log-SNR, and (b) on each path's own default grid (equal steps of its clock: real timesteps for DDPM, $t$ for
# cosine and flow, Karras' $\rho = 7$ for EDM), and measures the distance of the end point to the 2,000-step
# solution, in flow coordinates.

# %%


def own_grid(path, steps):
    start, end = (path.time_at_log_snr(torch.tensor([lam], dtype=torch.float64)).item() for lam in (LAM_START, LAM_END))
    if isinstance(path, EDMPath):
        return karras_sigmas(end, start, steps + 1).tolist()
    return torch.linspace(start, end, steps + 1, dtype=torch.float64).tolist()


for steps in (5, 10):
    for grid_name, grid in [("log-SNR grid", log_snr_grid), ("own grid", own_grid)]:
        errors = []
        for name, path in PATHS.items():
            times = grid(path, steps)
            end = in_flow_coordinates(path, times, ddim(path, y_start, times))[-1]
            errors.append(f"{name} {(end - reference[-1]).norm(dim=-1).mean():.4f}")
        print(f"DDIM-{steps:<2d} {grid_name:12s}: " + ", ".join(errors))

# %% [markdown]
# On one grid the four formulations give the same numbers; on their own grids they differ, and that difference is
# all a first-order solver sees of the formulation. Higher-order solvers also depend on the variable they
# extrapolate in: diffexp writes DPM-Solver++ and UniPC in log-SNR and Heun in $\tilde\sigma = \sigma/\alpha$, so
# each behaves the same on every path given the same grid, and any sampler runs on any path (`sampler.timestep_spacing=` chooses the grid). What the formulation changes beyond the grid is the
# *network*: what it is asked to predict and where training spends its samples (the first figure), and therefore
# where its errors are. That is what the trained models below measure.
#
# ## Trained models: the same noise through three digits models
# Three digits models trained by the quickstart's command with `formulation=ddpm` (shipped as `digits`), `edm`
# (`digits_edm`) and `flow` (`digits_flow`, the quickstart's default), each run 1,100 steps of batch 64. From
# the same unit noise (scaled to each path's prior: $\sigma_{max} = 80$ on EDM's), 200 DDIM steps follow each
# model's ODE; we measure the curves' excess length in their own and in flow coordinates, and show where they end.

# %%
models = {}
for name, overrides in [("digits", ["experiment=quickstart", "formulation=ddpm"]),
                        ("digits_edm", ["experiment=quickstart", "formulation=edm"]),
                        ("digits_flow", ["experiment=quickstart"])]:
    ckpt = pretrained_or_train(name, overrides, RUNS / name, steps=30 if FAST else None)
    models[name] = load(ckpt)[0]
noise = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(5))
ends, table = {}, []
for name, model in models.items():
    trajectory = model.sample(16, sampler=make_sampler(model, "ddim", 200), x_T=noise, return_trajectory=True)
    xs = torch.stack(trajectory.xs + [trajectory.sample]).flatten(2).double()
    times = trajectory.timesteps + [model.path.clean_time]
    scale = torch.tensor([sum(model.path.alpha_sigma(float(t))) for t in times], dtype=torch.float64)[:, None, None]
    ends[name] = trajectory.sample
    table.append((name, model.path.name, excess_length(xs).mean().item(), excess_length(xs / scale).mean().item()))
print(f"{'model':12s} {'path':6s} {'own coordinates':>16s} {'flow coordinates':>17s}")
for name, path_name, own, flowy in table:
    print(f"{name:12s} {path_name:6s} {own:16.4f} {flowy:17.4f}")

fig, axes = plt.subplots(1, len(ends), figsize=(3.2 * len(ends), 3.4))
for ax, (name, images) in zip(axes, ends.items()):
    ax.imshow(make_grid(images, nrow=4).squeeze(), cmap="gray")
    ax.set_title(f"{name} ({models[name].path.name}), DDIM-200", fontsize=9)
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# The same noise becomes different digits under different models: each model learned its own map from noise to
# data, and nothing ties them together (unlike the toy, where one exact denoiser made one ODE). In their own
# coordinates the variance-preserving DDPM model's curves are the longest detours (excess length 0.133, against 0.028
# for the flow model; EDM's 0.0003 reflects its long chord from $80\,\varepsilon$). Mapped to flow coordinates all
# three are nearly straight (0.02 to 0.04): in 256 dimensions the detour towards the data mean that dominated the
# two-dimensional toy is small against the distance from noise to data.
#
# ## The formulation sweep: quality against the number of evaluations
# `python train.py -m formulation=ddpm,edm,flow,vp` trains the quickstart once per formulation (1,100 steps, batch
# 64, seed 42); `experiments/scripts/compare_formulations.py` then samples 1,000 images per cell from the same noise
# and scores them with `fid_digits` (lower is better). The committed results (the README's table):

# %%
results = Path("results/formulations")
table = json.loads((results / "formulations.json").read_text())
fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
best = {}
for name, rows in table["results"].items():
    per_nfe = {}
    for r in rows:
        if r.get("reference"):
            continue
        if r["nfe"] not in per_nfe or r["fid_digits"] < per_nfe[r["nfe"]]["fid_digits"]:
            per_nfe[r["nfe"]] = r
    best[name] = per_nfe
    nfes = sorted(per_nfe)
    axes[0].plot(nfes, [per_nfe[n]["fid_digits"] for n in nfes], marker="o", label=name)
    converged = [r for r in rows if r.get("reference")]
    if converged:
        axes[0].axhline(converged[0]["fid_digits"], ls=":", lw=1, color=axes[0].lines[-1].get_color())
axes[0].set_xscale("log")
axes[0].set_xlabel("network evaluations (NFE)")
axes[0].set_ylabel("fid_digits (best sampler per cell)")
axes[0].set_title("one run per formulation (dotted: its converged ODE)")
axes[0].legend()
for name, rows in table["results"].items():
    print(name, {n: f"{r['fid_digits']:.3f} ({r['sampler']})" for n, r in sorted(best[name].items())})

seeds = json.loads((results / "seeds.json").read_text())["rows"]
for model in sorted({r["model"] for r in seeds}):
    rows = sorted((r for r in seeds if r["model"] == model), key=lambda r: r["nfe"])
    axes[1].errorbar([r["nfe"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                     marker="o", capsize=3, label=model)
axes[1].set_xscale("log")
axes[1].set_xlabel("network evaluations (NFE)")
axes[1].set_title(f"five sampling seeds: mean +- std ({seeds[0]['n']} images each)")
axes[1].legend()
fig.tight_layout()
fig.savefig(FIGURES / "10_sweep.png", dpi=80, bbox_inches="tight")
plt.show()
for r in seeds:
    print(f"{r['model']:5s} {r['sampler']:24s} NFE {r['nfe']:3d}: {r['mean']:.3f} +- {r['std']:.3f}")

# %% [markdown]
# What to conclude, from these numbers and no more:
#
# - **At 10 and 20 evaluations DDPM and flow tie.** With five sampling seeds they score within each other's spread
#   (0.555 +- 0.087 against 0.532 +- 0.094 at NFE 10); the single-run differences between ddpm, flow and vp in the
#   left panel at NFE >= 10 are of the size of that seed-to-seed noise.
# - **The EDM run trails** at 10 evaluations (1.06 with its best sampler, against 0.38 to 0.50) and a little at 20
#   (0.67 against 0.42 to 0.48), more than the seed spread of sampling. The sweep trained each formulation once,
#   so it cannot separate EDM's recipe on 16x16 digits from the variance between training runs.
# - **At 5 evaluations the flow model is ahead of DDPM** (five seeds: 0.72 +- 0.14 against 1.51 +- 0.19, both with
#   UniPC on trailing spacing). The `vp` run (cosine path, v-prediction, one seed) scores alike (0.60), so the gain
#   goes with starting at pure noise with a target that stays bounded there (v, velocity), not with the flow path's
#   straight lines: the toy above showed that the path alone changes a solver's grid, not its ODE.
# - **The sampler and its time grid matter as much as the formulation.** The DDPM model at NFE 5 scores 4.18 with
#   DPM-Solver++(2M) on the Karras grid and 1.60 with the same solver on the trailing grid; EDM's own Heun sampler
#   scores 9.62 at 5 evaluations and 0.89 at 19, where DPM-Solver++(2M) on the same model gives 1.28 at 5.
# - One run per formulation on 1,797 digits is a small experiment: treat a difference smaller than the seed spread
#   as no difference, and rerun the sweep with `seed=` values before believing one.
