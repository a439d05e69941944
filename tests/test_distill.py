"""Few-step generation by training: consistency tuning/distillation, progressive distillation, reflow.

Tensor-level checks against the formulas (boundary condition, ECT's Delta-t schedule and loss, the progressive
target, the consistency sampler with its exact oracle), then the training mechanics through train.py's run
(teacher frozen and not saved, resume, halving rounds, reproducible reflow pairs, refusals)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffexp.diffusion import get_prediction, to_x0_eps
from diffexp.distillation import (ConsistencyObjective, ProgressiveObjective, check_boundary, consistency_function,
                                  ect_sigma_r, pseudo_huber)
from diffexp.guiders import CFG
from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath
from diffexp.samplers import ConsistencySampler, get_sampler
from diffexp.schedules import get_schedule

BOUNDED = ("epsilon", "v_prediction", "velocity", "edm")


def paths():
    return {"ddpm": DiscretePath(get_schedule("linear", 1000)), "cosine": CosinePath(t_max=0.999), "edm": EDMPath(),
            "flow": FlowPath()}


def random_net(seed: int = 0):
    weight = torch.randn(1, generator=torch.Generator().manual_seed(seed))

    def net(x, noise_input):
        return torch.tanh(weight * x) + 0.01 * noise_input.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)

    return net


@pytest.mark.parametrize("path_name", ["ddpm", "cosine", "edm", "flow"])
@pytest.mark.parametrize("prediction_type", BOUNDED)
def test_consistency_function_is_the_denoiser_and_exact_at_the_clean_time(path_name, prediction_type):
    """f = c_skip x + c_out F equals the denoiser's x_0 (to_x0_eps) at every time, c_skip = 1 and c_out = 0 at the
    clean time, f(x, clean) = x bit for bit, and f -> x continuously as t -> clean."""
    path = FlowPath(t_max=0.999) if path_name == "flow" else paths()[path_name]  # epsilon needs alpha > 0
    prediction = get_prediction(prediction_type)
    net = random_net()
    x = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(path.t_min, path.t_max, 5, dtype=torch.float64)
    f = consistency_function(net, prediction, path, x, t)
    model_fn = prediction.model_fn(net, path)
    alpha, sigma = path.coefficients(t, x)
    expected = to_x0_eps(model_fn(x, t), x, alpha, sigma, prediction.sampler_type, path.variance_preserving)[0]
    torch.testing.assert_close(f, expected, rtol=1e-9, atol=1e-9)
    c_skip, c_out = prediction.x0_coefficients(torch.tensor(1.0, dtype=torch.float64),
                                               torch.tensor(0.0, dtype=torch.float64), path.variance_preserving)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    clean = torch.full((5,), path.clean_time, dtype=torch.float64)
    assert torch.equal(consistency_function(net, prediction, path, x, clean), x)
    near = torch.full((5,), float(path.time_at_ve_sigma(torch.tensor(1e-7), clamp=path_name == "ddpm")),
                      dtype=torch.float64)
    sigma_near = path.ve_sigma(float(near[0]))  # 1e-7; the discrete table ends at sigma ~ 0.01
    assert sigma_near <= 1e-7 * 1.001 or path_name == "ddpm"
    torch.testing.assert_close(consistency_function(net, prediction, path, x, near), x,
                               atol=sigma_near * (2 + float(x.abs().max())), rtol=0)  # |f - x| = O(sigma (|x| + |F|))


def test_a_sample_prediction_has_no_boundary_condition():
    check_boundary(get_prediction("velocity"))
    with pytest.raises(ValueError, match="epsilon, v_prediction, velocity or edm"):
        check_boundary(get_prediction("sample"))
    with pytest.raises(ValueError, match="skip connection"):
        ConsistencyObjective(FlowPath(), get_prediction("sample"))


def test_ect_mapping_and_its_stages():
    """r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), at least 0; Delta-t halves per stage where sigmoid(-bt) ~ 0."""
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    for stage in range(4):
        expected = torch.clamp(sigma * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + torch.exp(sigma)))), min=0)
        torch.testing.assert_close(ect_sigma_r(sigma, stage), expected, rtol=1e-12, atol=0)
    delta = [float(80.0 - ect_sigma_r(torch.tensor([80.0], dtype=torch.float64), s)) for s in range(4)]
    assert all(abs(a / b - 2) < 1e-9 for a, b in zip(delta, delta[1:]))
    assert float(ect_sigma_r(torch.tensor([0.01]), 0)) == 0.0  # stage 0, small sigma: regress on the data


def test_pseudo_huber():
    d = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(pseudo_huber(d, 0.0), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(pseudo_huber(d, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))


def ect_reference(net, x0, sigma_t, sigma_r, noise, c, sigma_data=0.5):
    """ECT's loss on EDM's path written out (Geng et al. 2024): D(x, s) = c_skip x + c_out F(c_in x, ln(s)/4),
    ||D(x0 + t eps, t) - sg D(x0 + r eps, r)|| pseudo-Huber, / (t - r); D(., 0) = x0."""
    def D(x, s):
        s = s.reshape(-1, 1, 1, 1)
        total = s**2 + sigma_data**2
        return sigma_data**2 / total * x + s * sigma_data / total.sqrt() * net(x / total.sqrt(), 0.25 * s.log().flatten())

    f_t = D(x0 + sigma_t.reshape(-1, 1, 1, 1) * noise, sigma_t)
    with torch.no_grad():
        f_r = D(x0 + sigma_r.reshape(-1, 1, 1, 1) * noise, sigma_r.clamp(min=1e-30))
        f_r = torch.where((sigma_r == 0).reshape(-1, 1, 1, 1), x0, f_r)
    squared = (f_t - f_r).flatten(1).square().sum(1)
    return (((squared + c**2).sqrt() - c) / (sigma_t - sigma_r)).mean()


@pytest.mark.parametrize("step", [0, 1000])
def test_consistency_loss_matches_ect_written_out(step):
    """On EDM's path with EDM's preconditioning the objective is ECT's loss (stage 0: many r = 0, stage 5: all r > 0),
    the gradient flowing through f(x_t, t) only."""
    path, prediction = EDMPath(), get_prediction("edm")
    weight = torch.tensor([0.7], requires_grad=True)
    net = lambda x, noise_input: torch.tanh(weight * x) * (1 + 0.1 * noise_input.reshape(-1, 1, 1, 1).to(x.dtype))
    objective = ConsistencyObjective(path, prediction, stage_steps=200, c=0.01)
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = objective.loss(net, x0, torch.Generator().manual_seed(3), step)
    (grad,) = torch.autograd.grad(loss, weight)
    g = torch.Generator().manual_seed(3)  # the same draws, in the objective's order
    t, r, sigma_t, sigma_r = objective.times(6, step, g, "cpu")
    noise = torch.randn(x0.shape, generator=g)
    assert bool((sigma_r == 0).any()) == (step == 0) and bool((sigma_r < sigma_t).all())
    expected = ect_reference(net, x0, sigma_t.float(), sigma_r.float(), noise, 0.01)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_consistency_distillation_takes_the_teachers_ode_step():
    """target=teacher: x_r = alpha_r (x0_hat + sigma_r eps_hat) from the teacher at x_t (Euler = DDIM); with the
    exact teacher of a point mass the step is exact, so a student equal to the data has zero loss."""
    path, prediction = FlowPath(), get_prediction("velocity")
    point = torch.full((4, 1, 2, 2), 0.3)
    exact_teacher = lambda x, t: (point, (x - path.coefficients(t, x)[0] * point) / path.coefficients(t, x)[1])
    exact_student = lambda x, noise_input: (x - point) / (noise_input / 1000).reshape(-1, 1, 1, 1).to(x.dtype)  # u = eps - x0
    for solver in ("euler", "heun"):
        objective = ConsistencyObjective(path, prediction, target="teacher", solver=solver, stage_steps=1)
        loss = objective.loss(exact_student, point, torch.Generator().manual_seed(0), 10, exact_teacher)
        assert float(loss) < 1e-3
        with pytest.raises(ValueError, match="needs the teacher"):
            objective.loss(exact_student, point, torch.Generator().manual_seed(0), 10, None)


@pytest.mark.parametrize("path_name", ["ddpm", "flow", "edm"])
def test_progressive_target_lands_on_two_teacher_steps(path_name):
    """One DDIM step from (x_t, t) with the target (x~0, eps~) reaches the teacher's two-step x_t'' exactly."""
    path, prediction = paths()[path_name], get_prediction("v_prediction" if path_name == "ddpm" else "velocity")
    objective = ProgressiveObjective(path, prediction)
    steps = 4
    grid = objective.grid(steps)
    torch.testing.assert_close(objective.grid(2 * steps)[0::2], grid)  # the student's grid nests in the teacher's
    assert grid[0] == path.t_max and len(grid) == steps
    teacher_net = prediction.model_fn(random_net(1), path)

    def teacher(x, t):
        alpha, sigma = path.coefficients(t, x)
        return to_x0_eps(teacher_net(x, t), x, alpha, sigma, prediction.sampler_type, path.variance_preserving)

    x0 = torch.randn(steps, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = grid.clone()
    x_t = path.noised(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x0_target, eps_target = objective.target(teacher, x_t, t, steps)
    spacing = (path.t_max - path.clean_time) / steps
    x = x_t
    for shift in (0.5, 1.0):
        s = torch.where(t - shift * spacing < path.clean_time + 1e-9, path.clean_time, t - shift * spacing)
        previous = t if shift == 0.5 else t - 0.5 * spacing
        hat0, hat_eps = teacher(x, previous)
        alpha_s, sigma_s = path.coefficients(s, x)
        x = alpha_s * hat0 + sigma_s * hat_eps
    alpha_end, sigma_end = path.coefficients(t - spacing if path_name != "ddpm" else
                                             torch.where(t - spacing < 0, -1.0, t - spacing), x_t)
    torch.testing.assert_close(alpha_end * x0_target + sigma_end * eps_target, x, rtol=1e-9, atol=1e-9)
    alpha, sigma = path.coefficients(t, x_t)
    torch.testing.assert_close(alpha * x0_target + sigma * eps_target, x_t, rtol=1e-9, atol=1e-9)


def test_progressive_loss_is_zero_for_a_student_that_already_jumps():
    """A student whose one step equals the teacher's two (both exact for a point mass) has zero loss."""
    path, prediction = FlowPath(), get_prediction("velocity")
    point = torch.full((8, 1, 2, 2), -0.4)

    def teacher(x, t):
        alpha, sigma = path.coefficients(t, x)
        return point, (x - alpha * point) / sigma

    student = lambda x, noise_input: (x - point) / (noise_input / 1000).reshape(-1, 1, 1, 1).to(x.dtype)
    loss = ProgressiveObjective(path, prediction).loss(student, teacher, point, torch.Generator().manual_seed(0), 4)
    assert float(loss) < 1e-8


def consistency_oracle(path, mu, s, prediction_type="velocity"):
    """The exact consistency function of data N(mu, s^2) on ``path`` (the probability-flow ODE's map to the clean
    time keeps the standardised value): x_0 = mu + s (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2), in the form of
    a ``prediction_type`` model output."""
    def model_fn(x, t):
        alpha, sigma = path.coefficients(t.double(), x.double())
        xd = x.double()
        x0 = mu + s * (xd - alpha * mu) / (alpha**2 * s**2 + sigma**2).sqrt()
        eps = (xd - alpha * x0) / sigma
        return {"velocity": eps - x0, "epsilon": eps, "v_prediction": alpha * eps - sigma * x0}[prediction_type].to(x.dtype)

    return model_fn


@pytest.mark.parametrize("path_name,prediction_type", [("flow", "velocity"), ("ddpm", "v_prediction"),
                                                      ("edm", "epsilon")])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_with_the_exact_consistency_function_samples_the_data_law(path_name, prediction_type, steps):
    path = paths()[path_name]
    sampler = get_sampler("consistency", path, prediction_type=prediction_type, steps=steps, progress=False)
    assert isinstance(sampler, ConsistencySampler) and sampler.nfe() == steps
    traj = sampler.sample(consistency_oracle(path, 0.5, 0.3, prediction_type), shape=(8000, 1, 1, 1),
                          generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert traj.nfe == steps
    assert traj.sample.mean().item() == pytest.approx(0.5, abs=0.01)
    assert traj.sample.std().item() == pytest.approx(0.3, rel=0.02)


def test_consistency_sampler_levels():
    path, velocity = FlowPath(), {"prediction_type": "velocity"}
    assert get_sampler("consistency", path, steps=2, **velocity).timesteps.tolist() == [1.0, 0.5]
    sampler = get_sampler("consistency", path, steps=3, sigmas=[2.0, 0.5], **velocity)
    torch.testing.assert_close(sampler.timesteps, torch.tensor([1.0, 2 / 3, 1 / 3], dtype=torch.float64))
    for sigmas, fragment in [([1.0], "2 of them"), ([0.5, 2.0], "descending"), ([2.0, -1.0], "positive")]:
        with pytest.raises(ValueError, match=fragment):
            get_sampler("consistency", path, steps=3, sigmas=sigmas, **velocity)
    with pytest.raises(ValueError, match="below the first level"):
        get_sampler("consistency", EDMPath(), steps=2, sigmas=[100.0])


# --- training: what a user runs ----------------------------------------------------------------------------------
from tests.conftest import SHRINK, compose_config  # noqa: E402


def distill_config(tmp_path, name: str, teacher, *extra: str, run: str = "run"):
    return compose_config("train", SHRINK + [f"distill={name}", f"init_from={teacher}", *extra], tmp_path / run)


def build_and_fit(cfg):
    from diffexp.train import build

    datamodule, model, _, _, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    return model


def test_consistency_distillation_trains_against_a_frozen_teacher_that_no_checkpoint_holds(tmp_path, tiny_checkpoint):
    """distill=consistency distill.target=teacher: the teacher stays in eval mode with frozen, unchanged weights,
    outside the student's state dict and checkpoints (which record its path and fingerprint); the student moves
    from the teacher's weights; the checkpoint samples with the consistency sampler."""
    from functools import partial

    from diffexp.api import load_model
    from diffexp.cache import weights_fingerprint
    from diffexp.checkpoints import read_checkpoint
    from diffexp.lit.distill import STATE_KEY

    cfg = distill_config(tmp_path, "consistency", tiny_checkpoint, "distill.target=teacher", "distill.stage_steps=2")
    model = build_and_fit(cfg)
    teacher = model.distill.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert weights_fingerprint(teacher.net) == model.distill.teacher_fingerprint
    start, _ = load_model(tiny_checkpoint)
    assert weights_fingerprint(start.net) == model.distill.teacher_fingerprint  # the EMA weights init_from used
    assert weights_fingerprint(model.net) != model.distill.teacher_fingerprint  # the student trained
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert set(checkpoint["state_dict"]) == set(model.state_dict())
    assert checkpoint[STATE_KEY]["teacher"] == str(tiny_checkpoint)
    assert checkpoint[STATE_KEY]["teacher_fingerprint"] == model.distill.teacher_fingerprint
    from diffexp.samplers import ConsistencySampler

    student, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    for steps in (1, 2):
        images = student.sample(3, sampler=partial(ConsistencySampler, steps=steps, progress=False),
                                generator=torch.Generator().manual_seed(0))
        assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()


def test_reflow_pairs_are_reproducible_resumable_and_tied_to_their_setting(tmp_path, tiny_checkpoint):
    from functools import partial

    from diffexp.api import load_model
    from diffexp.lit.distill import Reflow
    from diffexp.samplers import EulerSampler

    student, _ = load_model(tiny_checkpoint)
    teacher, _ = load_model(tiny_checkpoint)
    reflow = Reflow(str(tiny_checkpoint), pairs=6, shard_size=4, sampler=partial(EulerSampler, steps=3),
                    seed=7, pairs_dir=str(tmp_path / "pairs"))
    reflow.bind(student)
    reflow.attach_teacher(student, teacher)
    reflow.prepare_pairs(student)
    first = {k: v.clone() for k, v in reflow.data.items()}
    assert first["noise"].shape == first["sample"].shape == (6, 1, 16, 16)
    shard0 = tmp_path / "pairs" / "pairs_00000.pt"
    written = shard0.stat().st_mtime_ns
    (tmp_path / "pairs" / "pairs_00001.pt").unlink()  # an interrupted generation
    reflow.prepare_pairs(student)
    assert shard0.stat().st_mtime_ns == written  # kept, not drawn again
    for key in first:
        assert torch.equal(reflow.data[key], first[key])
    z = first["noise"][:4]
    sampler = EulerSampler(teacher.path, steps=3, prediction_type="velocity", progress=False)
    expected = sampler.sample(teacher.conditioner.model_fn(teacher.denoiser_fn("fp32"), 4, {}, CFG(1.0), teacher.path,
                                                           "velocity", "cpu"),
                              x_T=z)
    torch.testing.assert_close(first["sample"][:4], expected)  # the teacher's ODE from that noise
    other = Reflow(str(tiny_checkpoint), pairs=6, shard_size=4, sampler=partial(EulerSampler, steps=5), seed=7,
                   pairs_dir=str(tmp_path / "pairs"))
    other.attach_teacher(student, teacher)
    with pytest.raises(ValueError, match="another teacher or setting"):
        other.prepare_pairs(student)


@pytest.mark.parametrize("overrides,fragment", [
    (["distill=consistency"], "init_from=TEACHER"),
    (["distill=consistency", "formulation=ddpm", "init_from={teacher}"], "does not match this run's student"),
    (["distill=consistency", "model.prediction_type=sample", "init_from={teacher}"], "skip connection"),
    (["distill=reflow", "formulation=ddpm", "init_from={teacher}"], "flow models"),
    (["distill=consistency", "distill.target=ode", "init_from={teacher}"], "distill.target"),
    (["distill=progressive", "distill.start_steps=12", "init_from={teacher}"], "divisible by 2\\^rounds"),
])
def test_distillation_refuses_what_cannot_work(tmp_path, tiny_checkpoint, overrides, fragment):
    from diffexp.train import build

    cfg = compose_config("train", SHRINK + [o.format(teacher=tiny_checkpoint) for o in overrides], tmp_path / "run")
    with pytest.raises(ValueError, match=fragment):
        build(cfg)


def test_a_resumed_run_refuses_another_teacher():
    from diffexp.lit.distill import ConsistencyDistillation

    distill = ConsistencyDistillation("teacher.ckpt")
    distill.teacher_fingerprint = "aaaa"
    with pytest.raises(ValueError, match="holds other weights"):
        distill.load_state_dict({"method": "consistency", "teacher": "teacher.ckpt", "teacher_fingerprint": "bbbb"})
    with pytest.raises(ValueError, match="distill=progressive"):
        distill.load_state_dict({"method": "progressive"})


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("consistency", ["distill.target=teacher", "distill.solver=heun", "distill.stage_steps=2"]),
    ("progressive", ["distill.start_steps=4", "distill.rounds=2", "distill.steps_per_round=2"]),
    ("reflow", ["distill.pairs=12", "distill.shard_size=8", "distill.sampler.steps=3"]),
])
def test_distillation_resumes_bit_identically_mid_run(tmp_path, tiny_checkpoint, name, extra):
    """Stopped after 2 of 4 steps (progressive: at the end of its first round) and resumed from last.ckpt, a
    distillation ends with the weights of an uninterrupted run; progressive writes each round's student."""
    from diffexp.checkpoints import read_weights
    from diffexp.train import run

    run(distill_config(tmp_path, name, tiny_checkpoint, *extra, run="whole"))
    run(distill_config(tmp_path, name, tiny_checkpoint, *extra, "trainer.max_steps=2", run="part"))
    part = tmp_path / "part" / "checkpoints"
    run(distill_config(tmp_path, name, tiny_checkpoint, *extra, f"ckpt_path={part / 'last.ckpt'}", run="part"))
    whole = read_weights(tmp_path / "whole" / "checkpoints" / "model.safetensors")
    resumed = read_weights(part / "model.safetensors")
    assert set(whole["state_dict"]) == set(resumed["state_dict"])
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    if name == "progressive":
        for steps in (2, 1):
            first = read_weights(tmp_path / "whole" / "checkpoints" / f"progressive_{steps}steps.safetensors")
            second = read_weights(part / f"progressive_{steps}steps.safetensors")
            assert all(torch.equal(v, second["state_dict"][k]) for k, v in first["state_dict"].items())


@pytest.mark.slow
def test_readme_distillation_commands_as_typed(fresh_workdir):
    """The README's few-step commands, verbatim from a fresh directory (training shrunk by SHRINK; reflow's pairs cut)."""
    import json

    from tests.conftest import readme_command, run_as_typed

    run_as_typed(readme_command("python train.py hydra.run.dir=logs/teacher"), fresh_workdir)
    assert (fresh_workdir / "logs" / "teacher" / "checkpoints" / "last.ckpt").is_file()
    pairs = [
        ("python train.py distill=consistency init_from=logs/teacher/checkpoints/last.ckpt",
         "python sample.py ckpt=logs/train/latest/checkpoints/model.safetensors sampler=consistency sampler.steps=2 "
         "n=256 metrics=[digits_classifier,fid_digits]"),
        ("python train.py distill=progressive init_from=logs/teacher/checkpoints/last.ckpt",
         "python sample.py ckpt=logs/train/latest/checkpoints/progressive_4steps.safetensors sampler=ddim "
         "sampler.steps=4 sampler.timestep_spacing=trailing"),
        ("python train.py distill=reflow init_from=logs/teacher/checkpoints/last.ckpt",
         "python sample.py ckpt=logs/train/latest/checkpoints/model.safetensors sampler=euler sampler.steps=1"),
    ]
    for train, sample in pairs:
        # reflow's 4,096 teacher solves of 20 steps take minutes on a CPU: 1,024 (one shard) of 5 steps here
        fewer_pairs = " distill.pairs=1024 distill.sampler.steps=5" if "distill=reflow" in train else ""
        run_as_typed(readme_command(train) + fewer_pairs, fresh_workdir)
        result = run_as_typed(readme_command(sample), fresh_workdir, shrink=False)
        grid = next(line.split("wrote ")[1].split(" and ")[0] for line in result.stdout.splitlines()
                    if line.startswith("[diffexp] wrote "))
        summary = json.loads((Path(grid).parent / "metrics.json").read_text())
        assert summary["nfe"] == int(sample.split("sampler.steps=")[1].split()[0]), summary


def test_consistency_sampler_refuses_sigmas_that_are_not_a_list():
    for sigmas, fragment in [(0.821, "must be a list"), (["abc"], "must hold numbers")]:
        with pytest.raises(ValueError, match=fragment):
            get_sampler("consistency", FlowPath(), steps=2, sigmas=sigmas, prediction_type="velocity")


@pytest.mark.slow
def test_progressive_resume_keeps_its_round_length_and_students_sample_on_their_grid(tmp_path, tiny_checkpoint):
    """steps_per_round=null fixes the rounds' length from the first max_steps; a resume with a larger max_steps keeps
    it (no round redone with the wrong teacher); each round's student file samples with its own steps."""
    from diffexp.checkpoints import read_checkpoint, read_weights
    from diffexp.train import run

    extra = ["distill.start_steps=4", "distill.rounds=2"]
    run(distill_config(tmp_path, "progressive", tiny_checkpoint, *extra, run="pd"))  # 4 steps: 2 per round
    checkpoints = tmp_path / "pd" / "checkpoints"
    state = read_checkpoint(checkpoints / "last.ckpt")["diffexp_distill"]
    assert state["round"] == 1 and state["round_length"] == 2
    written = {p.name: p.stat().st_mtime_ns for p in checkpoints.glob("progressive_*")}
    assert set(written) == {"progressive_2steps.safetensors", "progressive_1steps.safetensors"}
    assert read_weights(checkpoints / "progressive_2steps.safetensors")["diffexp_config"]["sampler"]["steps"] == 2
    run(distill_config(tmp_path, "progressive", tiny_checkpoint, *extra, "trainer.max_steps=6",
                       f"ckpt_path={checkpoints / 'last.ckpt'}", run="pd"))
    state = read_checkpoint(checkpoints / "last.ckpt")["diffexp_distill"]
    assert state["round"] == 1 and state["round_length"] == 2  # still the last round: not back to round 0
    assert (checkpoints / "progressive_2steps.safetensors").stat().st_mtime_ns == written["progressive_2steps.safetensors"]


@pytest.mark.slow
def test_a_class_conditional_teacher_distils_with_guidance_applied_at_sampling(tmp_path):
    """A conditional teacher: its conditions are dropped for exactly the items the student's are (one generator
    draw replayed), and the student samples each class with classifier-free guidance through the consistency
    sampler (two net passes per step, counted)."""
    from functools import partial

    from diffexp.api import load_model
    from diffexp.samplers import ConsistencySampler
    from diffexp.train import run

    run(compose_config("train", SHRINK + ["conditioning=class"], tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    model = build_and_fit(distill_config(tmp_path, "consistency", teacher, "conditioning=class",
                                         "conditioning.p_uncond=0.5"))
    batch = {"image": torch.zeros(64, 1, 16, 16), "label": torch.arange(64) % 10}
    student_cond, teacher_cond = model.distill.conditions(model, batch, True, torch.Generator().manual_seed(3))
    dropped = student_cond["class_labels"] == 10
    assert 0 < int(dropped.sum()) < 64  # some items dropped, not all
    assert torch.equal(student_cond["class_labels"], teacher_cond["class_labels"])
    student, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    labels = torch.tensor([0, 1, 2])
    sampler = partial(ConsistencySampler, steps=2, progress=False)
    guided = student.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0), class_labels=labels,
                            guidance_scale=2.0)
    assert student.last_net_passes == 4  # 2 steps x (conditional + unconditional)
    plain = student.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0), class_labels=labels,
                           guidance_scale=1.0)
    assert student.last_net_passes == 2
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
