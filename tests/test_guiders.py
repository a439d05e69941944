"""Guiders (diffexp.guiders) against their papers' formulas on fixed tensors, the samplers' side of CFG++, and the
guider= option through sample.py, the API and the playground."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffexp.diffusion import to_x0_eps
from diffexp.guiders import APG, CFG, AutoGuidance, CFGPlusPlus, IntervalCFG
from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath
from diffexp.samplers import get_sampler
from diffexp.schedules import get_schedule

PATHS = {"ddpm": lambda: DiscretePath(get_schedule("linear", 1000)), "cosine": lambda: CosinePath(t_max=0.999),
         "edm": lambda: EDMPath(), "flow": lambda: FlowPath()}


def fake_net(calls: list | None = None):
    """A net whose prediction depends on x, t and a per-item ``context`` (the condition)."""
    weight = torch.linspace(-1, 1, 2 * 4 * 4).reshape(2, 4, 4)

    def net(x, t, context):
        if calls is not None:
            calls.append(len(x))
        c = context.view(-1, 1, 1, 1)
        return torch.tanh(x * (1 + c)) + c * weight + 0.1 * t.view(-1, 1, 1, 1).float()

    return net


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    return x, {"context": torch.rand(n, generator=g) + 0.5}, {"context": torch.zeros(n)}


def times(path, n, fraction=0.5):
    t = path.t_min + fraction * (path.t_max - path.t_min)
    return torch.full((n,), float(round(t)) if isinstance(path, DiscretePath) else t)


def pair(net, x, t, cond, path, kind):
    alpha, sigma = path.coefficients(t, x)
    return to_x0_eps(net(x, t, **cond), x, alpha, sigma, kind, path.variance_preserving)


def test_cfg_is_the_formula_with_both_passes_in_one_call_and_counts_them():
    calls = []
    net, (x, cond, uncond) = fake_net(calls), inputs()
    t = torch.full((3,), 10.0)
    guided = CFG(3.0).bind(net, cond, uncond, None, "epsilon")
    out = guided(x, t)
    c, u = net(x, t, **cond), net(x, t, **uncond)
    torch.testing.assert_close(out, u + 3.0 * (c - u))
    assert calls[0] == 6 and guided.passes == 2  # one batched call of 2N, two passes per image
    single = CFG(1.0).bind(net, cond, uncond, None, "epsilon")
    torch.testing.assert_close(single(x, t), c)
    assert single.passes == 1


def guided_model(model_fn, cond, uncond, guidance_scale, guidance_rescale=0.0):
    return CFG(guidance_scale, guidance_rescale).bind(model_fn, cond, uncond, None, "epsilon")


def test_guidance_rescale_matches_conditional_std():
    def model_fn(x, t, context):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * context.view(-1, 1, 1, 1)

    x, t = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    cond, uncond = {"context": torch.full((4,), 1.0)}, {"context": torch.full((4,), 0.2)}
    full = guided_model(model_fn, cond, uncond, 7.5, guidance_rescale=1.0)(x, t)
    cond_std = model_fn(x, t, **cond).flatten(1).std(1)  # the same draws as the conditional half
    assert torch.allclose(full.flatten(1).std(1), cond_std, atol=1e-5)
    plain = guided_model(model_fn, cond, uncond, 7.5)(x, t)
    half = guided_model(model_fn, cond, uncond, 7.5, guidance_rescale=0.5)(x, t)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-5)


def test_guidance_scale_zero_is_unconditional():
    def model_fn(x, t, context):
        return x + context.view(-1, 1, 1, 1)

    x, t = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    cond, uncond = {"context": torch.full((3,), 2.0)}, {"context": torch.full((3,), -1.0)}
    assert torch.allclose(guided_model(model_fn, cond, uncond, 0.0)(x, t), model_fn(x, t, **uncond))
    assert torch.allclose(guided_model(model_fn, cond, uncond, 1.0)(x, t), model_fn(x, t, **cond))


@pytest.mark.parametrize("path_name", list(PATHS))
def test_interval_guides_only_inside_its_sigma_range_on_every_path(path_name):
    path, net, (x, cond, uncond) = PATHS[path_name](), fake_net(), inputs(4)
    kind = "epsilon" if path_name in ("ddpm", "cosine") else "velocity"
    # four times whose Karras sigma = sigma_t / alpha_t lie below, inside, inside, above [0.5, 2]
    sigmas = torch.tensor([0.2, 0.7, 1.8, 5.0], dtype=torch.float64)
    t = path.time_at_ve_sigma(sigmas, clamp=True).float()
    if isinstance(path, DiscretePath):
        t = t.round()
    ve = torch.tensor([path.ve_sigma(float(s)) for s in t])
    inside = (ve >= 0.5) & (ve <= 2.0)
    assert inside.tolist() == [False, True, True, False]
    guider = IntervalCFG(2.5, sigma_lo=0.5, sigma_hi=2.0)
    out = guider.bind(net, cond, uncond, path, kind)(x, t)
    c, u = net(x, t, **cond), net(x, t, **uncond)
    expected = torch.where(inside.view(-1, 1, 1, 1), u + 2.5 * (c - u), c)
    torch.testing.assert_close(out, expected)
    def one(i):
        return {k: v[i:i + 1] for k, v in cond.items()}, {k: v[i:i + 1] for k, v in uncond.items()}

    outside = guider.bind(net, *one(0), path, kind)
    outside(x[:1], t[:1])
    assert outside.passes == 1  # the conditional pass alone
    inside_item = guider.bind(net, *one(1), path, kind)
    inside_item(x[1:2], t[1:2])
    assert inside_item.passes == 2
    with pytest.raises(ValueError, match="sigma_lo must be below guider.sigma_hi"):
        IntervalCFG(2.0, sigma_lo=3.0, sigma_hi=1.0)


def apg_reference(x0_c, x0_u, w, eta, threshold, momentum, previous=None):
    """APG (Sadat et al. 2024, Algorithm 1 with momentum) written out in numpy per image."""
    diff = (x0_c - x0_u).astype(np.float64)
    average = diff if previous is None else diff + momentum * previous
    diff = average.copy()
    out = np.empty_like(diff)
    for i in range(len(diff)):
        d = diff[i]
        if threshold > 0:
            d = d * min(1.0, threshold / np.linalg.norm(d))
        unit = x0_c[i] / np.linalg.norm(x0_c[i])
        par = np.sum(d * unit) * unit
        out[i] = x0_c[i] + (w - 1) * ((d - par) + eta * par)
    return out, average


@pytest.mark.parametrize("path_name", ["ddpm", "flow"])
def test_apg_matches_the_paper_on_x0_with_momentum_threshold_and_a_consistent_eps(path_name):
    path, net, (x, cond, uncond) = PATHS[path_name](), fake_net(), inputs()
    kind = "v_prediction" if path_name == "ddpm" else "velocity"
    t = times(path, 3, 0.4)
    guider = APG(4.0, eta=0.3, norm_threshold=1.5, momentum=-0.5)
    guided = guider.bind(net, cond, uncond, path, kind)
    (x0_c, _), (x0_u, _) = pair(net, x, t, cond, path, kind), pair(net, x, t, uncond, path, kind)
    previous = None
    for step in range(2):  # the second call sees the first's momentum average
        x0, eps = guided(x, t)
        expected, previous = apg_reference(x0_c.numpy(), x0_u.numpy(), 4.0, 0.3, 1.5, -0.5, previous)
        np.testing.assert_allclose(x0.numpy(), expected, rtol=1e-5, atol=1e-5)
        alpha, sigma = path.coefficients(t, x)
        torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=1e-4, atol=1e-4)  # eps consistent with x_t
    assert guided.passes == 4
    # eta = 1, no momentum, no threshold: CFG on x0
    plain = APG(4.0, eta=1.0, norm_threshold=0.0, momentum=0.0).bind(net, cond, uncond, path, kind)(x, t)[0]
    torch.testing.assert_close(plain, x0_u + 4.0 * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
    # w = 1: the conditional prediction, from its one pass
    unguided = APG(1.0).bind(net, cond, uncond, path, kind)
    torch.testing.assert_close(unguided(x, t), net(x, t, **cond))
    assert unguided.passes == 1


@pytest.mark.parametrize("path_name", ["ddpm", "flow", "edm"])
def test_cfgpp_ddim_step_renoises_with_the_unconditional_eps_on_every_path(path_name):
    """One DDIM step (eta = 0) under CFG++: x' = alpha' (x0_u + lam (x0_c - x0_u)) + sigma' eps_u (Chung et al. 2024,
    Algorithm 1) with the path's own alpha and sigma."""
    path, net, (x, cond, uncond) = PATHS[path_name](), fake_net(), inputs()
    kind = "velocity" if path_name == "flow" else "epsilon"
    sampler = get_sampler("ddim", path, steps=4, prediction_type=kind, progress=False)
    t, t_next = float(sampler.timesteps[1]), float(sampler.timesteps[2])
    guided = CFGPlusPlus(0.4).bind(net, cond, uncond, path, kind)
    x_next, _ = sampler.step(sampler.denoiser(guided), x, t, t_next)
    tt = torch.full((3,), t)
    (x0_c, _), (x0_u, eps_u) = pair(net, x, tt, cond, path, kind), pair(net, x, tt, uncond, path, kind)
    alpha, sigma = path.alpha_sigma(t_next)
    torch.testing.assert_close(x_next, alpha * (x0_u + 0.4 * (x0_c - x0_u)) + sigma * eps_u, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"lambda\) must be in \[0, 1\]"):
        CFGPlusPlus(1.5)


def test_autoguidance_is_the_guide_plus_w_times_the_difference_in_x0_and_eps():
    path, (x, cond, _) = FlowPath(), inputs()
    main, weak = fake_net(), (lambda x, t, context: 0.5 * fake_net()(x, t, context) - 0.1)
    t = times(path, 3)
    x0, eps = AutoGuidance(2.0).bind(main, cond, cond, path, "velocity", weak, cond)(x, t)
    (x0_m, eps_m), (x0_g, eps_g) = pair(main, x, t, cond, path, "velocity"), pair(weak, x, t, cond, path, "velocity")
    torch.testing.assert_close(x0, x0_g + 2.0 * (x0_m - x0_g))
    torch.testing.assert_close(eps, eps_g + 2.0 * (eps_m - eps_g))
    with pytest.raises(ValueError, match="guide_ckpt"):
        AutoGuidance(2.0).bind(main, cond, cond, path, "velocity")


def test_default_guidance_is_cfg_unchanged(tiny_class_checkpoint):
    """model.sample without a guider, with guidance_scale/guidance_rescale, and with guider=CFG: the same images."""
    from diffexp.api import load_model

    model, _ = load_model(tiny_class_checkpoint)
    labels = torch.tensor([1, 2, 3])

    def draw(**options):
        return model.sample(3, generator=torch.Generator().manual_seed(0), class_labels=labels, progress=False,
                            **options)

    assert torch.equal(draw(guidance_scale=3.0, guidance_rescale=0.5), draw(guider=CFG(3.0, 0.5)))
    assert model.last_net_passes == 2 * len(model.make_sampler().timesteps)
    assert torch.equal(draw(), draw(guider=CFG(None, None)))  # None: the model's defaults
    assert model.last_net_passes == (1 if model.guidance_scale == 1 else 2) * len(model.make_sampler().timesteps)


def test_cfgpp_refuses_a_sampler_that_steps_from_x_t(tiny_class_checkpoint):
    from functools import partial

    from diffexp.api import load_model
    from diffexp.samplers import DPMSolver2M

    model, _ = load_model(tiny_class_checkpoint)
    with pytest.raises(ValueError, match=r"guider=cfgpp needs a sampler that steps from the pair.*'ddim'"):
        model.sample(2, sampler=partial(DPMSolver2M, steps=3), class_labels=torch.tensor([0, 1]),
                     guider=CFGPlusPlus(0.5), progress=False)


def test_autoguidance_guide_is_checked_against_the_model(tiny_checkpoint, tiny_ddpm_checkpoint):
    from diffexp.api import load_model, make_guider

    model, _ = load_model(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"cannot guide this model: path: .* there, FlowPath.* here"):
        make_guider("auto", model, scale=2.0, guide_ckpt=str(tiny_ddpm_checkpoint))
    with pytest.raises(ValueError, match="guider=auto needs guider.guide_ckpt=CKPT"):
        make_guider("auto", model, scale=2.0)
    with pytest.raises(ValueError, match=r"guider='nope'; choose one of \['apg', 'auto', 'cfg', 'cfgpp', 'interval'\]"):
        make_guider("nope", model)
    guider = make_guider("auto", model, scale=1.5, guide_ckpt=str(tiny_checkpoint))  # itself: D_g + w (D - D_g) = D
    a = model.sample(2, generator=torch.Generator().manual_seed(0), guider=guider, progress=False)
    b = model.sample(2, generator=torch.Generator().manual_seed(0), progress=False)
    assert model.last_net_passes == len(model.make_sampler().timesteps)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guider", ["cfg", "interval", "apg", "cfgpp", "auto"])
def test_sample_py_takes_every_guider(tmp_path, tiny_class_checkpoint, guider):
    import json

    from diffexp.sample import run
    from tests.conftest import compose_config

    extra = [f"guider.guide_ckpt={tiny_class_checkpoint}"] if guider == "auto" else []
    out = tmp_path / "samples"
    summary = run(compose_config("sample", [f"ckpt={tiny_class_checkpoint}", "n=2", "sampler.steps=3", "progress=false",
                                            f"guider={guider}", "guidance_scale=2", f"out={out}", "device=cpu", *extra],
                                 tmp_path / "s"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["guider"].startswith({"cfg": "CFG(", "interval": "IntervalCFG(", "apg": "APG(",
                                       "cfgpp": "CFGPlusPlus(", "auto": "AutoGuidance("}[guider])
    assert summary["net_passes_per_image"] == (6 if guider != "interval" else saved["net_passes_per_image"])
    assert (out / "grid.png").is_file()


def test_sample_py_guider_errors_name_the_option(tmp_path, tiny_class_checkpoint):
    from diffexp.sample import run
    from tests.conftest import compose_config

    def sample(*overrides):
        run(compose_config("sample", [f"ckpt={tiny_class_checkpoint}", "n=2", "sampler.steps=2", "progress=false",
                                      f"out={tmp_path / 'o'}", "device=cpu", *overrides], tmp_path / "s"))

    with pytest.raises(ValueError, match="guider=auto needs guider.guide_ckpt=CKPT"):
        sample("guider=auto")
    with pytest.raises(ValueError, match=r"guider.scale \(CFG\+\+'s lambda\) must be in \[0, 1\]"):
        sample("guider=cfgpp", "guider.scale=3")
    with pytest.raises(ValueError, match="guider.momentum must be in"):
        sample("guider=apg", "guider.momentum=2")


def test_playground_samples_with_a_guider(tiny_class_checkpoint):
    pytest.importorskip("gradio")
    from diffexp.app import build_guider, compare_samplers, load_checkpoint

    model = load_checkpoint(str(tiny_class_checkpoint))
    assert build_guider(model, "cfg", 3.0, None) is None
    assert isinstance(build_guider(model, "apg", 3.0, None), APG)
    with pytest.raises(ValueError, match="guide checkpoint"):
        build_guider(model, "auto", 2.0, "")
    with pytest.raises(ValueError, match=r"lambda\)=3 must lie in \[0, 1\]"):
        build_guider(model, "cfgpp", 3.0, None)
    a, b = compare_samplers(str(tiny_class_checkpoint), "ddim", 2, "euler", 2, 0, 2, "", 0.5, "cfgpp", None)
    assert a.endswith("ddim.png") and b.endswith("euler.png")


@pytest.mark.slow
def test_readme_guider_commands_as_typed(fresh_workdir):
    """The README's guider commands verbatim from a fresh directory laid out like a checkout (its src/ holds the
    shipped models), the guide's training shrunk by SHRINK."""
    import json
    from pathlib import Path

    from tests.conftest import ROOT, readme_command, run_as_typed

    (fresh_workdir / "src").symlink_to(ROOT / "src")
    prompt = 'python sample.py ckpt=src/diffexp/pretrained/shapes_text/model.safetensors prompt="a large red circle ' \
             'in the center" n=8 sampler.steps=20 '

    def sample(command):
        result = run_as_typed(readme_command(command), fresh_workdir, shrink=False)
        grid = next(line.split("wrote ")[1].split(" and ")[0] for line in result.stdout.splitlines()
                    if line.startswith("[diffexp] wrote "))
        return json.loads((Path(grid).parent / "metrics.json").read_text())

    expected = {"guider=interval guidance_scale=3": "IntervalCFG(scale=3.0", "guider=apg guidance_scale=5": "APG(scale=5.0",
                "guider=cfgpp guider.scale=0.6": "CFGPlusPlus(scale=0.6"}
    for tail, start in expected.items():
        summary = sample(prompt + tail)
        assert summary["guider"].startswith(start) and summary["prompts"] == ["a large red circle in the center"]
    run_as_typed(readme_command("python train.py experiment=shapes_text2img trainer.max_steps=300 "
                                "hydra.run.dir=logs/guide"), fresh_workdir)
    summary = sample(prompt + "guider=auto guider.guide_ckpt=logs/guide/checkpoints/model.safetensors")
    assert summary["guider"].startswith("AutoGuidance(") and summary["net_passes_per_image"] == 40


@pytest.mark.slow
def test_compare_guiders_script_writes_its_table_and_plot(tmp_path):
    """experiments/scripts/compare_guiders.py on the shipped text model, shrunk: one row per guider and scale with
    the net passes counted, and the plot."""
    import json

    from tests.conftest import ROOT, run_script

    shipped = ROOT / "src" / "diffexp" / "pretrained" / "shapes_text" / "model.safetensors"
    out = tmp_path / "guiders"
    run_script("experiments/scripts/compare_guiders.py", "--ckpt", str(shipped), "--guide", str(shipped), "--n", "4",
               "--steps", "2", "--scales", "2", "--lambdas", "0.5", "--out", str(out), check=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    # rows come in diffexp.guiders.GUIDERS order, whatever order they were drawn or resumed in
    assert [(r["guider"], r["scale"]) for r in rows] == [("cfg", 2.0), ("interval", 2.0), ("apg", 2.0), ("cfgpp", 0.5),
                                                         ("auto", 2.0)]
    assert all(r["net_passes"] == 4 for r in rows if r["guider"] != "interval")
    assert all(0 <= r["adherence"] <= 1 and math.isfinite(r["fid_shapes"]) for r in rows)
    assert out.with_suffix(".png").is_file()
    again = run_script("experiments/scripts/compare_guiders.py", "--ckpt", str(shipped), "--n", "4", "--guiders", "cfg",
                       "--out", str(out))
    assert again.returncode != 0 and "already holds results" in again.stderr
