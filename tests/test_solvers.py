"""Few-step solvers (DPM-Solver++, UniPC, Euler/Heun/ancestral Euler) against diffusers' schedulers, on Gaussian
data with the exact denoiser, and with zero-terminal-SNR schedules."""
import math

import diffusers
import pytest
import torch

from diffexp.paths import DiscretePath
from diffexp.samplers import SAMPLERS, get_sampler, spaced_timesteps
from diffexp.schedules import alpha_bar_at, get_schedule, karras_sigmas, sigmas_of, timestep_at_sigma
from tests.test_samplers import gaussian_denoiser

T = 1000
SOLVERS = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler", "heun", "euler_ancestral"]


def toy_model(x, t):
    """A smooth stand-in for a network whose output depends on x and (real) t."""
    return 0.9 * torch.tanh(0.7 * x + 0.001 * t.to(x.dtype).view(-1, 1, 1, 1))


def diffusers_scheduler(name, schedule, prediction_type, karras, timesteps):
    """diffusers' scheduler for ``name`` pinned to diffexp's settings: the same betas, prediction type, spacing
    (Karras sigmas, or trailing integer timesteps), final sigma 0, solver order and final-step rule."""
    common = dict(num_train_timesteps=T, trained_betas=schedule.betas.numpy(), prediction_type=prediction_type,
                  timestep_spacing="linspace" if karras else "trailing")  # Euler/Heun take Karras' range from it
    if name.startswith("dpmpp"):
        sch = diffusers.DPMSolverMultistepScheduler(
            **common, solver_order=3 if name == "dpmpp_3m" else 2, use_karras_sigmas=karras,
            algorithm_type="sde-dpmsolver++" if name == "dpmpp_2m_sde" else "dpmsolver++", solver_type="midpoint",
            lower_order_final=True, euler_at_final=False, final_sigmas_type="zero", thresholding=False)
    elif name == "unipc":
        sch = diffusers.UniPCMultistepScheduler(**common, solver_order=2, solver_type="bh2", predict_x0=True,
                                                use_karras_sigmas=karras, lower_order_final=True,
                                                final_sigmas_type="zero", disable_corrector=[])
    elif name == "euler":
        sch = diffusers.EulerDiscreteScheduler(**common, use_karras_sigmas=karras, final_sigmas_type="zero")
    elif name == "heun":
        sch = diffusers.HeunDiscreteScheduler(**common, use_karras_sigmas=karras)
    else:
        sch = diffusers.EulerAncestralDiscreteScheduler(**common)
    sch.set_timesteps(len(timesteps))
    if not karras:
        assert sch.timesteps[::2 if name == "heun" else 1].long().tolist() == timesteps.tolist()
    sch.set_begin_index(0)  # rounded Karras timesteps repeat (cosine: 999 three times); count steps, not values
    return sch


def diffusers_trajectory(sch, name, x_T, model_fn, seed):
    """x after each of diffusers' steps, in the variance-preserving form (Euler-type schedulers keep
    x / alpha; they are converted back), for a trajectory started from ``x_T``."""
    k_space = name in ("euler", "heun", "euler_ancestral")
    sigmas = sch.sigmas.double()
    x = x_T.clone() * (sigmas[0] ** 2 + 1).sqrt().float() if k_space else x_T.clone()
    generator, out = torch.Generator().manual_seed(seed), []
    for i, t in enumerate(sch.timesteps):
        model_in = sch.scale_model_input(x, t)
        kwargs = {"generator": generator} if name in ("dpmpp_2m_sde", "euler_ancestral") else {}
        x = sch.step(model_fn(model_in, t.expand(len(x))), t, x, **kwargs).prev_sample
        if name == "heun" and not sch.state_in_first_order and i < len(sch.timesteps) - 1:
            continue  # the intermediate Euler point of a Heun step
        sigma_next = float(sch.sigmas[sch.step_index]) if k_space else None
        out.append(x / math.sqrt(sigma_next**2 + 1) if k_space else x)
    return out


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SOLVERS)
def test_solver_trajectories_match_diffusers(name, prediction_type, schedule_name, steps):
    """Step for step from the same noise and model: Karras spacing for all but ancestral Euler (diffusers'
    has none: trailing there), and the same integer timesteps (trailing) for the multistep solvers.

    The one convention that differs by design: diffusers' DPM-Solver++ and UniPC call the network at Karras
    timesteps rounded to integers (stepping with the unrounded sigma); diffexp calls it at the real timestep of
    that sigma. Rounding t inside the model function reproduces diffusers exactly, which is what is checked."""
    schedule = get_schedule(schedule_name, T)
    spacings = ["trailing"] if name == "euler_ancestral" else ["karras", "trailing"]
    for spacing in spacings:
        sampler = get_sampler(name, schedule, steps=steps, timestep_spacing=spacing,
                              prediction_type=prediction_type, progress=False)
        rounds_t = spacing == "karras" and name in ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
        model_fn = (lambda x, t: toy_model(x, t.round())) if rounds_t else toy_model
        sch = diffusers_scheduler(name, schedule, prediction_type, spacing == "karras", sampler.timesteps)
        x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        if name in ("euler", "heun", "euler_ancestral") and spacing == "trailing" and float(sch.sigmas[0]) > 1e3:
            # diffusers' Euler-type schedulers step x / alpha with float32 sigmas: from sigma = 2e4 (cosine at
            # t = T-1, trailing) the first update cancels terms of that size (~1e-3 lost, more after Heun's
            # correction); both sides run in float64 there, diffusers with its sigmas recomputed in float64
            x_T = x_T.double()
            sigmas = sigmas_of(schedule.alphas_cumprod)
            sch.sigmas = torch.cat([sigmas[sch.timesteps.long()], torch.zeros(1, dtype=torch.float64)])
        traj = sampler.sample(model_fn, x_T=x_T, generator=torch.Generator().manual_seed(7), return_trajectory=True)
        ours = traj.xs[1:] + [traj.sample]
        theirs = diffusers_trajectory(sch, name, x_T, model_fn, seed=7)
        assert len(ours) == len(theirs) == steps
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()),
                                       msg=f"{name} {spacing} step {i}")


def test_karras_timesteps_match_diffusers_before_rounding():
    """The Karras sigmas (rho = 7) from sigma_{T-1} to sigma_0, mapped to t by log-sigma interpolation."""
    for schedule_name in ("linear", "cosine"):
        schedule = get_schedule(schedule_name, T)
        sch = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, trained_betas=schedule.betas.numpy(),
                                               use_karras_sigmas=True)
        sch.set_timesteps(12)
        ours = spaced_timesteps(DiscretePath(schedule), 12, "karras")
        torch.testing.assert_close(ours.float(), sch.timesteps, rtol=1e-4, atol=1e-2)  # diffusers: float32
    edm = karras_sigmas(0.002, 80.0, 3, rho=7.0)  # EDM's defaults: the midpoint is the mean of sigma^(1/7)
    torch.testing.assert_close(edm, torch.tensor([80.0, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, 0.002],
                                                 dtype=torch.float64))
    abar = get_schedule("linear", T).alphas_cumprod
    t = torch.tensor([0.0, 3.25, 500.5, 998.9])
    back = timestep_at_sigma(abar, sigmas_of(alpha_bar_at(abar, t)))  # the inverse of alpha_bar_at
    torch.testing.assert_close(back, t.double(), rtol=0, atol=1e-9)


def test_euler_is_ddim():
    """Euler in (sigma, x / alpha) and DDIM (eta = 0) are the same update (Karras et al. 2022, Sec. 4)."""
    schedule = get_schedule("linear", T)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for spacing in ("karras", "trailing"):
        euler = get_sampler("euler", schedule, steps=15, timestep_spacing=spacing, progress=False)
        ddim = get_sampler("ddim", schedule, steps=15, timestep_spacing=spacing, progress=False)
        torch.testing.assert_close(euler.sample(toy_model, x_T=x_T), ddim.sample(toy_model, x_T=x_T),
                                   rtol=1e-5, atol=1e-5)


def gaussian_errors(name, steps, **kwargs):
    """Relative errors of the samples' (mean, std) for N(0.5, 0.3^2) data under the exact denoiser."""
    schedule = get_schedule("linear", T)
    sampler = get_sampler(name, schedule, steps=steps, progress=False, **kwargs)
    x = sampler.sample(gaussian_denoiser(schedule, 0.5, 0.3, "epsilon"), shape=(20000, 1, 1, 1),
                       generator=torch.Generator().manual_seed(0))
    return abs(x.mean().item() / 0.5 - 1), abs(x.std().item() / 0.3 - 1)


def test_second_order_solvers_beat_ddim_at_ten_evaluations():
    """At 10 NFE the std error of DDIM-10 (leading spacing) is large (0.36 here); DPM-Solver++(2M), UniPC and
    the 2M SDE with Karras spacing are clearly better (0.07, 0.11, 0.03). Heun spends two evaluations per step:
    it is compared at 39 NFE with DDIM-40 (0.06 vs 0.10). (DPM-Solver++(3M) at 10 Karras steps is not: 0.34 here, 0.02 at 20.)"""
    ddim = gaussian_errors("ddim", 10)[1]
    assert ddim > 0.3
    for name in ("dpmpp_2m", "unipc", "dpmpp_2m_sde"):
        mean_error, std_error = gaussian_errors(name, 10)
        assert std_error < 0.5 * ddim, (name, std_error, ddim)
        assert mean_error < 0.015, (name, mean_error)
    assert gaussian_errors("heun", 20)[1] < 0.7 * gaussian_errors("ddim", 40)[1]  # 0.062 vs 0.099


@pytest.mark.parametrize("name", SOLVERS)
def test_every_solver_converges_to_the_data_law(name):
    """More steps, smaller error; at 100 steps (300 for ancestral Euler, a first-order SDE solver) the std is
    right to 3 %."""
    many = 300 if name == "euler_ancestral" else 100
    errors = [gaussian_errors(name, steps)[1] for steps in (5, 20, many)]
    assert errors[0] > errors[2] and errors[2] < 0.03, errors


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_zero_terminal_snr_with_v_prediction(name):
    """Zero terminal SNR (sigma_{T-1} = inf) and trailing spacing, which starts at t = T-1: every sampler
    that can start from pure noise does (finite samples, the data mean), the others say why not."""
    schedule = get_schedule("linear", T, rescale_zero_terminal_snr=True)
    kwargs = {"steps": 20} if name != "ddpm" else {}
    make = lambda **extra: get_sampler(name, schedule, prediction_type="v_prediction", progress=False,
                                       **kwargs, **extra)
    model_fn = gaussian_denoiser(schedule, 0.5, 0.3, "v_prediction")
    sampler = make(timestep_spacing="trailing")
    traj = sampler.sample(model_fn, shape=(4000, 1, 1, 1), generator=torch.Generator().manual_seed(0),
                          return_trajectory=True)
    x = traj.sample
    assert torch.isfinite(x).all() and x.mean().item() == pytest.approx(0.5, abs=0.02)
    if name in ("heun", "edm"):  # Heun's correction is undefined from infinite noise: that first step is Euler's
        assert traj.nfe == sampler.nfe() == 2 * len(sampler.timesteps) - 2
    with pytest.raises(ValueError, match="timestep_spacing=trailing"):
        make(timestep_spacing="karras")


def test_nfe_of_heun_and_bad_settings():
    schedule = get_schedule("linear", T)
    assert get_sampler("heun", schedule, steps=10).nfe() == 19
    assert get_sampler("dpmpp_2m", schedule, steps=10).nfe() == 10
    for name, kwargs, fragment in [("dpmpp_2m", {"order": 4}, "sampler.order"),
                                   ("dpmpp_3m", {"eta": 0.5}, "orders 1 and 2"),
                                   ("unipc", {"order": 0}, "sampler.order"),
                                   ("euler_ancestral", {"eta": 2}, "sampler.eta"),
                                   ("dpmpp_2m", {"timestep_spacing": "exponential"}, "timestep_spacing")]:
        with pytest.raises(ValueError, match=fragment):
            get_sampler(name, schedule, **kwargs)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_a_config_of_its_name(name, tmp_path):
    """``sampler=<name>`` composes and builds the registered class; ``course.sampler(model, name)`` does too."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config("train", [f"sampler={name}", "sampler.progress=false"], tmp_path)
    sampler = instantiate(cfg.sampler)(path=get_schedule("linear", T))
    assert type(sampler) is SAMPLERS[name]
    default = {"ddim": "leading", "ddpm": "leading", "consistency": "trailing"}.get(name, "karras")
    assert getattr(sampler, "timestep_spacing", "karras") == default


def test_course_sampler_and_sample_with_a_solver(tmp_path):
    from diffexp import course
    from diffexp.config import build_model, data_of_run
    from tests.conftest import SHRINK, compose_config

    cfg = compose_config("train", SHRINK, tmp_path)
    model = build_model(cfg, data_of_run(cfg, from_checkpoint=False))
    sampler = course.sampler(model, "heun", steps=4)
    assert type(sampler) is SAMPLERS["heun"] and sampler.prediction_type == model.prediction_type
    images = model.sample(2, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="not a known sampler"):
        course.sampler(model, "dpm++")


@pytest.mark.slow
def test_sample_py_with_a_few_step_solver(tiny_checkpoint, tmp_path):
    """As a user types it: sample.py sampler=dpmpp_2m sampler.steps=10; metrics.json carries the NFE."""
    import json

    from tests.conftest import run_script

    out = tmp_path / "dpm"
    run_script("sample.py", f"ckpt={tiny_checkpoint}", "sampler=dpmpp_2m", "sampler.steps=10", "n=8",
               f"out={out}", "metrics=[digits_classifier]", cwd=tmp_path, check=True)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["nfe"] == 10 and summary["sampler"]["_target_"] == "diffexp.samplers.DPMSolver2M"
    out = tmp_path / "heun"
    run_script("sample.py", f"ckpt={tiny_checkpoint}", "sampler=heun", "sampler.steps=5", "n=4",
               f"out={out}", "metrics=[digits_classifier]", cwd=tmp_path, check=True)
    # the tiny model is a flow model: Heun's first step leaves t = 1 (infinite noise) as Euler, so 1 + 2 * 3 + 1
    assert json.loads((out / "metrics.json").read_text())["nfe"] == 8


@pytest.mark.slow
def test_evaluate_samplers_nfe_grid_and_resume(tiny_checkpoint, tmp_path):
    """The benchmark script: a grid of solvers x NFE plus reference rows, tables after every row, a plot, and
    --resume adding only what is missing."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, user_env

    out = tmp_path / "grid"
    base = [sys.executable, str(ROOT / "experiments" / "scripts" / "evaluate_samplers.py"), "--ckpt",
            str(tiny_checkpoint), "--n", "8", "--metrics", "fid_digits", "--out", str(out)]
    run = lambda *extra: subprocess.run([*base, *extra], cwd=tmp_path, env=user_env(tmp_path), capture_output=True,
                                        text=True, timeout=900)
    result = run("--nfe", "3", "5", "--solvers", "ddim", "heun", "--references", "ddim:6")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    # Heun on the flow path spends 2 steps - 2: NFE 3 and 5 are each between two step counts, and the steps
    # round((NFE + 1) / 2) (2 and 3) break the tie
    assert [(r["name"], r["nfe"], r["reference"]) for r in rows] == [
        ("ddim", 3, False), ("ddim", 5, False), ("heun", 2, False), ("heun", 4, False), ("ddim", 6, True)]
    assert all(r["n"] == 8 and r["fid_digits"] > 0 for r in rows) and out.with_suffix(".png").is_file()
    result = run("--nfe", "3", "5", "--solvers", "ddim", "heun", "--references", "ddim:6", "ddim:7", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert again[:5] == rows and again[5]["sampler"] == "DDIM-7" and len(again) == 6
    # bad input: one line naming the problem, exit 2, before sampling; the tables at --out are never replaced
    written = out.with_suffix(".json").read_text()
    for extra, message in [(["--samplers", "ddim:2", "dpmpp_2m:2:bogus", "--resume"], "timestep_spacing"),
                           (["--samplers", "nosuch:5", "--resume"], "must be one of"),
                           (["--nfe", "3", "--solvers", "nosuch", "--resume"], "must be one of"),
                           (["--samplers", "ddim:x", "--resume"], "positive integer"),
                           (["--metrics", "nosuch", "--resume"], "nosuch"),
                           (["--samplers", "ddim:2"], "already holds results")]:
        result = run(*extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (
            extra, result.stderr[-1500:])
    assert out.with_suffix(".json").read_text() == written


def test_trailing_spacing_has_exactly_the_steps_asked_for():
    """T - i T/steps by arange gains a step for some counts (61, 103, ...) through float rounding; not here."""
    path = DiscretePath(get_schedule("linear", T))
    for steps in range(1, T + 1):
        ts = spaced_timesteps(path, steps, "trailing")
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0 and (ts[:-1] > ts[1:]).all(), steps


def test_unipc_keeps_what_a_step_hook_wrote_and_ends_first_order():
    schedule = get_schedule("linear", T)
    sampler = get_sampler("unipc", schedule, steps=6, progress=False)
    denoiser, state = sampler.denoiser(toy_model), {}
    ts = sampler.timesteps.tolist()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    predicted, _ = sampler.step(denoiser, x, ts[0], ts[1], state=state)
    hooked = predicted.clone()
    hooked[0] = 0.25  # what an inpainting hook writes into the known region
    sampler.step(denoiser, hooked, ts[1], ts[2], state=state)
    assert torch.equal(state["x"][0], hooked[0])  # the corrector left the hook's values
    assert not torch.equal(state["x"][1], hooked[1])  # and corrected the rest
    no_lower = get_sampler("unipc", schedule, steps=6, lower_order_final=False, progress=False)
    assert torch.isfinite(no_lower.sample(toy_model, x_T=x)).all()


def test_course_sampler_options():
    from types import SimpleNamespace

    from diffexp import course

    model = SimpleNamespace(make_sampler=lambda factory: factory(path=get_schedule("linear", T)))
    assert len(course.sampler(model, "ddpm").timesteps) == T  # the sampler's own default steps
    assert course.sampler(model, "unipc", steps=7, progress=True, order=3).progress is True
