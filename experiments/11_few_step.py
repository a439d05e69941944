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
# # 11. A few steps by training: consistency models, progressive distillation, reflow
#
# A diffusion or flow model defines an ODE from noise to data; solvers (notebook 05) follow it in 10-50 model
# evaluations because its trajectories are **curved**: a single Euler step from pure noise lands on the model's
# $\hat x_0$ there, which for an exact model is the mean of the whole training set (pure noise says nothing about
# $x_0$): the same blur for every noise. Few-step generation *trains* a student to jump:
#
# - a **consistency model** (Song et al. 2023; easy consistency tuning, Geng et al. 2024) learns
#   $f(x_t, t) = x_0$ for every point of a trajectory, with $f(x, t_{clean}) = x$ built in:
#   $f = c_{skip}(t)\,x + c_{out}(t)\,F_\theta(x, t)$, $c_{skip} = 1$ and $c_{out} = 0$ at the clean time;
# - **progressive distillation** (Salimans & Ho 2022) halves the step count round after round, each student
#   matching two of its teacher's DDIM steps with one;
# - **reflow** (Liu et al. 2023) retrains a rectified flow on its own (noise, sample) pairs, whose straight
#   interpolations cross far less, so the new flow's trajectories are straighter (each further reflow straightens
#   them more).
#
# `python train.py distill=consistency init_from=TEACHER` (or `progressive`, `reflow`) does each. Here: the
# rectified-flow quickstart model as the teacher and its consistency student, both shipped with diffexp
# (`DIFFEXP_NOTEBOOK_TRAIN=1` trains them here instead).

# %%
import json
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from diffexp.course import load, notebook_settings, pretrained_or_train, sampler as make_sampler
from diffexp.distillation import ect_sigma_r
from diffexp.samplers import ConsistencySampler, EulerSampler, fixed_noise
from diffexp.images import make_grid

FAST, RUNS, FIGURES = notebook_settings()
teacher_ckpt = pretrained_or_train("digits_flow", ["experiment=quickstart"], RUNS / "digits_flow",
                                   steps=30 if FAST else None)
student_ckpt = pretrained_or_train("digits_consistency", ["distill=consistency", f"init_from={teacher_ckpt}"],
                                   RUNS / "digits_consistency", steps=20 if FAST else None)
teacher, _ = load(teacher_ckpt)
student, _ = load(student_ckpt)
print(teacher.path, teacher.prediction, "| student:", type(student.distill).__name__)

# %% [markdown]
# ## The teacher's trajectories bend where the image is decided
# We follow the teacher's probability-flow ODE with 100 Euler steps from a few noises $x_1$ and project every
# $x_t$ onto the plane spanned by the start $x_1$ and the end $x_0$ (the first axis along $x_1$). A rectified flow
# is nearly straight by length (the path, measured in pixel space, is barely longer than the chord), but it bends
# near the data, and at the scale of an image that bend is everything: the first Euler step's landing point, the
# teacher's $\hat x_0$ at pure noise, is (nearly) the mean of the training digits, the same blur for every noise,
# far from where the path ends.

# %%
x_T = fixed_noise(4, teacher.sample_shape, seed=3)
fine = EulerSampler(teacher.path, steps=100, prediction_type=teacher.prediction.sampler_type, progress=False)
path = teacher.sample(4, sampler=fine, x_T=x_T, return_trajectory=True)


def plane(start, end):
    """Orthonormal basis of the plane through 0 spanned by start and end (flattened)."""
    e1 = start.flatten() / start.norm()
    e2 = end.flatten() - (end.flatten() @ e1) * e1
    return e1, e2 / e2.norm()


def project(points, basis):
    e1, e2 = basis
    return torch.stack([torch.stack([p.flatten() @ e1, p.flatten() @ e2]) for p in points])


fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
bends = []
for i, ax in enumerate(axes):
    xs = [x[i] for x in path.xs] + [path.sample[i]]
    basis = plane(xs[0], xs[-1])
    curve = project(xs, basis)
    chord_length = (xs[-1] - xs[0]).norm()
    length = sum((b - a).norm() for a, b in zip(xs, xs[1:]))  # in pixel space (the projection would shorten it)
    bends.append(float(length / chord_length))
    ax.plot(*curve.T, lw=2, label="teacher ODE (100 Euler steps)")
    ax.plot(*torch.stack([curve[0], curve[-1]]).T, "k--", lw=1, label="chord")
    first_guess = project([path.x0s[0][i]], basis)[0]
    ax.plot(*first_guess, "o", color="tab:red", label="one Euler step")
    ax.set_title(f"noise {i}: path {bends[-1]:.2f}x the chord")
    ax.set_aspect("equal")
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIGURES / "11_teacher_curves.png", dpi=80, bbox_inches="tight")
plt.show()
print("path length / chord length:", [round(b, 3) for b in bends])

# %% [markdown]
# ## The student jumps
# The consistency sampler evaluates the student once at pure noise ($x_0 = f(x_1, 1)$); with more steps it noises
# that guess back to a lower level ($x_t = (1 - t)\,x_0 + t\,z$, fresh $z$) and jumps again. Below, from the same
# noises: one Euler step of the teacher, the teacher's 20-step DPM-Solver++(2M) result, and the student at 1, 2
# and 4 evaluations.

# %%
rows = {"teacher, 1 Euler step": teacher.sample(4, sampler=make_sampler(teacher, "euler", 1), x_T=x_T),
        "teacher, DPM-Solver++(2M) 20": teacher.sample(4, sampler=make_sampler(teacher, "dpmpp_2m", 20), x_T=x_T)}
for steps in (1, 2, 4):
    rows[f"student, {steps} step{'s' * (steps > 1)}"] = student.sample(
        4, sampler=partial(ConsistencySampler, steps=steps, progress=False), x_T=x_T,
        generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.9))
for ax, (title, images) in zip(axes, rows.items()):
    ax.imshow(make_grid(images, nrow=2).squeeze(), cmap="gray")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()
fig.savefig(FIGURES / "11_student_jumps.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# Where do the student's jumps land relative to the teacher's path? Its one-step output should sit near the
# teacher's end point, while the teacher's own one-step guess sits near the middle of the plane.

# %%
fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
one_step = rows["student, 1 step"]
for i, ax in enumerate(axes):
    xs = [x[i] for x in path.xs] + [path.sample[i]]
    basis = plane(xs[0], xs[-1])
    ax.plot(*project(xs, basis).T, lw=2, label="teacher ODE")
    ax.plot(*project([path.x0s[0][i]], basis)[0], "o", color="tab:red", label="teacher, one Euler step")
    ax.plot(*project([one_step[i]], basis)[0], "*", ms=12, color="tab:green", label="student, one step")
    ax.set_aspect("equal")
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(FIGURES / "11_jumps_in_the_plane.png", dpi=80, bbox_inches="tight")
plt.show()
end_error = [(one_step[i] - path.sample[i]).norm() / path.sample[i].norm() for i in range(4)]
euler_error = [(path.x0s[0][i] - path.sample[i]).norm() / path.sample[i].norm() for i in range(4)]
print("relative distance to the teacher's ODE end point: student one step", [round(float(e), 3) for e in end_error],
      "| teacher one Euler step", [round(float(e), 3) for e in euler_error])

# %% [markdown]
# ## The boundary condition and ECT's schedule
# For the flow path's velocity prediction $u = \varepsilon - x_0$, the denoiser is
# $x_0 = x_t - t\,u$: $c_{skip} = 1/(\alpha + \sigma) = 1$ and $c_{out} = -\sigma/(\alpha+\sigma) = -t$, so
# $c_{out} \to 0$ as $t \to 0$ and $f(x, 0) = x$ whatever the net says. Consistency tuning ties $f$ at a noise
# level $t$ to $f$ at a slightly lower $r$ (stop-gradient), on the same noise. ECT's $r(t)$ starts far below $t$
# (early stages regress on the data itself) and moves towards it stage by stage ($\Delta t$ halves).

# %%
t = torch.linspace(0, 1, 101, dtype=torch.float64)
alpha, sigma = teacher.path.coefficients(t, torch.zeros(101, 1, dtype=torch.float64))
c_skip, c_out = teacher.prediction.x0_coefficients(alpha, sigma, teacher.path.variance_preserving)
x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
from diffexp.distillation import consistency_function  # noqa: E402

f_clean = consistency_function(lambda *_: torch.full_like(x, 1e6), teacher.prediction, teacher.path, x,
                               torch.zeros(2, dtype=torch.float64))
print("f(x, clean) == x with a net that outputs 1e6:", torch.equal(f_clean, x))

sigma_t = torch.logspace(-2.5, 1.5, 200, dtype=torch.float64)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
axes[0].plot(t, c_skip.flatten(), label="$c_{skip}$")
axes[0].plot(t, c_out.flatten(), label="$c_{out}$")
axes[0].set_xlabel("flow time t")
axes[0].legend()
axes[0].set_title("the consistency parameterisation (velocity)")
for stage in range(5):
    axes[1].plot(sigma_t, ect_sigma_r(sigma_t, stage) / sigma_t, label=f"stage {stage}")
axes[1].set_xscale("log")
axes[1].set_xlabel("EDM sigma_t = t / (1 - t)")
axes[1].set_ylabel("sigma_r / sigma_t")
axes[1].set_title("ECT's mapping sigma_t -> sigma_r (q = 2, k = 8, b = 1)")
axes[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "11_parameterisation.png", dpi=80, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Reflow straightens, on data small enough to see
# Rectified flow trains on **independent** pairs: a random noise $\varepsilon$ and a random data point $x_0$,
# joined by straight lines. Those lines cross, and where they cross the velocity the net learns is an average of
# directions, so the ODE's trajectories bend. Reflow (Liu et al. 2023) solves the trained ODE from each noise and
# trains a new flow on the resulting **coupled** pairs (noise, where its ODE ends): their lines cross far less, and
# the new flow's trajectories straighten. On five points in the plane the first flow needs no net (its
# velocity is exact: $v = (y - \hat x_0)/u$ with the posterior mean $\hat x_0$); the reflowed one is a small MLP
# trained on 4,096 ODE pairs for a few seconds.

# %%
torch.manual_seed(0)
points = torch.tensor([[1.0, 0.0], [0.31, 0.95], [-0.81, 0.59], [-0.81, -0.59], [0.31, -0.95]])


def exact_velocity(y, u):
    """The rectified flow of data uniform on ``points``: (y - E[x0 | y_u]) / u on the path y = (1 - u) x0 + u eps."""
    u = u.reshape(-1, 1)
    logits = -((y[:, None] - (1 - u)[:, None] * points[None]) ** 2).sum(-1) / (2 * u**2)
    return (y - torch.softmax(logits, dim=1) @ points) / u


def euler(velocity, y, steps, keep=False):
    """Euler's method from u = 1 (noise) to u = 0 (data) in equal steps; every point with ``keep``."""
    us, ys = torch.linspace(1, 0, steps + 1), [y]
    for u, u_next in zip(us[:-1], us[1:]):
        y = y + (u_next - u) * velocity(y, u.expand(len(y)))
        ys.append(y)
    return torch.stack(ys) if keep else y


noise = torch.randn(4096, 2)
with torch.no_grad():
    ends = euler(exact_velocity, noise, 400)  # the ODE coupling: (noise, its end)
net = torch.nn.Sequential(torch.nn.Linear(3, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(),
                          torch.nn.Linear(128, 2))
optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
for step in range(300 if FAST else 3000):
    batch = torch.randint(0, len(noise), (512,))
    u = torch.rand(512, 1)
    y = (1 - u) * ends[batch] + u * noise[batch]
    loss = ((net(torch.cat([y, u], 1)) - (noise[batch] - ends[batch])) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
reflowed = lambda y, u: net(torch.cat([y, u.reshape(-1, 1)], 1))  # noqa: E731

test = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
independent = points[torch.randint(0, 5, (40,))]
for a, b in zip(noise[:40], independent):
    axes[0].plot([a[0], b[0]], [a[1], b[1]], color="tab:gray", lw=0.6)
for a, b in zip(noise[:40], ends[:40]):
    axes[0].plot([a[0], b[0]], [a[1], b[1]], color="tab:blue", lw=0.8)
axes[0].set_title("pairs: independent (grey) vs the ODE's (blue)", fontsize=9)
report = {}
with torch.no_grad():
    for ax, (name, velocity) in zip(axes[1:], [("rectified flow (exact)", exact_velocity), ("reflowed (MLP)", reflowed)]):
        path = euler(velocity, test, 400, keep=True)
        for i in range(12):
            ax.plot(*path[:, i].T, lw=1)
        arc = (path[1:] - path[:-1]).norm(dim=-1).sum(0)
        excess = (arc / (path[-1] - path[0]).norm(dim=-1) - 1).mean().item()
        one_step = (euler(velocity, test, 1) - path[-1]).norm(dim=-1).mean().item()
        to_data = torch.cdist(path[-1], points).min(dim=1).values.mean().item()  # do the ODE's ends stay on the data?
        report[name] = (excess, one_step, to_data)
        ax.set_title(f"{name}: excess length {excess:.3f}", fontsize=9)
for ax in axes:
    ax.scatter(*points.T, c="k", s=14, zorder=3)
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(FIGURES / "11_reflow.png", dpi=80, bbox_inches="tight")
plt.show()
for name, (excess, one_step, to_data) in report.items():
    print(f"{name:24s} excess length {excess:.3f}; one Euler step lands {one_step:.3f} from its own ODE's end; "
          f"the ODE's ends lie {to_data:.3f} from the nearest data point")

# %% [markdown]
# The reflowed flow's trajectories are close to straight, so one Euler step lands near where its ODE ends; the
# exact flow's one step lands on the data mean. Reflow is meant to change *which* noise goes to which point (the
# coupling), not the data distribution; the last number says how far the reflowed ODE's ends drift off the five
# points, the price of the MLP's fitting error.
#
# On digits that price dominates. The reflowed student learns from its teacher's samples, so it inherits the
# teacher's errors and adds its own, and 1,100 steps of training do not straighten a 256-dimensional flow as five
# points are straightened: in the table below reflow is the weakest method at every NFE (1.05 at one evaluation,
# 2.17 times the teacher's 20-step fid_digits). **Progressive distillation** (each round's student matches two DDIM
# steps of its teacher with one, $8 \to 4 \to 2 \to 1$ steps: the columns are its rounds) loses quality round by
# round, and the consistency student is the best at 1 and 2 evaluations.
#
# ## Measured: every method against its teacher
# `experiments/scripts/compare_distillation.py` scores each student at 1, 2, 4 and 8 evaluations against the
# teacher at 20 and its converged ODE (N = 1,000 from the same noise; the README's table).

# %%
results = Path("results/distill/distill.md")
if results.is_file():
    print(results.read_text())
    table = json.loads(results.with_suffix(".json").read_text())
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method, method_rows in table["methods"].items():
        points = sorted((r["nfe"], r["fid_digits"]) for r in method_rows)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(table["teacher_20"]["fid_digits"], color="k", ls="--", lw=1, label="teacher, 20 NFE")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model evaluations")
    ax.set_ylabel("fid_digits")
    ax.legend(fontsize=8)
    plt.show()
