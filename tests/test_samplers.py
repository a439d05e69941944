"""Every sampler passes the same checks; DDIM/DDPM also agree with diffusers step for step."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffexp.paths import DiscretePath
from diffexp.samplers import SAMPLERS, DDIMSampler, DDPMSampler, Sampler, get_sampler, spaced_timesteps
from diffexp.schedules import alpha_bar_at, get_schedule

T = 1000


def toy_model(x, t):
    """A smooth deterministic stand-in for a denoiser (depends on x and t)."""
    return 0.3 * torch.tanh(x) + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype) * x.mean()


def gaussian_denoiser(schedule, mu, sigma, prediction_type):
    """The exact E[eps | x_t] (or x0 / v) for data x0 ~ N(mu, sigma^2): the optimal network."""
    abar = schedule.alphas_cumprod

    def model_fn(x, t):
        ab = (alpha_bar_at(abar, t.double()) if t.is_floating_point() else abar[t]).view(-1, 1, 1, 1).to(x)
        var = ab * sigma**2 + 1 - ab
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / var
        x0 = mu + ab.sqrt() * sigma**2 * (x - ab.sqrt() * mu) / var
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return model_fn


# every registered sampler with its defaults, plus settings worth checking on their own
EXTRA_CASES = {
    "ddpm": [{"variance_type": "fixed_large"}],
    "ddim": [{"steps": 50, "eta": 1.0}, {"steps": 20, "timestep_spacing": "trailing"},
             {"steps": 30, "timestep_spacing": "linspace"}],
}
SAMPLER_CASES = [(name, {}) for name in sorted(SAMPLERS)] + [
    (name, kwargs) for name in sorted(SAMPLERS) for kwargs in EXTRA_CASES.get(name, [])]


@pytest.mark.parametrize("name,kwargs", SAMPLER_CASES)
class TestEverySampler:
    def make(self, name, kwargs, **extra):
        return get_sampler(name, get_schedule("linear", T), progress=False, **kwargs, **extra)

    def test_shape_and_determinism(self, name, kwargs):
        sampler = self.make(name, kwargs)
        a = sampler.sample(toy_model, shape=(3, 2, 4, 4), generator=torch.Generator().manual_seed(1))
        b = sampler.sample(toy_model, shape=(3, 2, 4, 4), generator=torch.Generator().manual_seed(1))
        c = sampler.sample(toy_model, shape=(3, 2, 4, 4), generator=torch.Generator().manual_seed(2))
        assert a.shape == (3, 2, 4, 4) and torch.isfinite(a).all()
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_global_rng_untouched(self, name, kwargs):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        self.make(name, kwargs).sample(toy_model, shape=(2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        assert torch.equal(torch.rand(3), expected)

    def test_x_T_and_trajectory(self, name, kwargs):
        sampler = self.make(name, kwargs)
        x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        traj = sampler.sample(toy_model, x_T=x_T, generator=torch.Generator().manual_seed(0), return_trajectory=True)
        n = len(sampler.timesteps)
        assert len(traj.xs) == len(traj.x0s) == len(traj.timesteps) == n
        assert torch.equal(traj.xs[0], x_T)
        assert traj.timesteps == sorted(traj.timesteps, reverse=True)
        final = sampler.sample(toy_model, x_T=x_T, generator=torch.Generator().manual_seed(0))
        assert torch.equal(final, traj.sample)

    def test_nfe_counted_and_sampler_not_mutated(self, name, kwargs):
        sampler = self.make(name, kwargs)
        before = dict(vars(sampler))
        calls = []
        traj = sampler.sample(lambda x, t: calls.append(1) or toy_model(x, t), shape=(1, 1, 2, 2),
                              generator=torch.Generator().manual_seed(0), return_trajectory=True)
        assert traj.nfe == len(calls) == sampler.nfe()
        assert vars(sampler).keys() == before.keys()
        assert all(vars(sampler)[k] is v for k, v in before.items())
        other = sampler.with_options(clip_sample=not sampler.clip_sample)
        assert other.clip_sample != sampler.clip_sample and sampler.clip_sample == before["clip_sample"]
        with pytest.raises(ValueError, match="with_options can change"):
            sampler.with_options(steps=3)

    def test_start_step_and_step_hook(self, name, kwargs):
        """Starting at step k runs the remaining steps only; the hook's x is what the next step sees."""
        sampler = self.make(name, kwargs)
        k = len(sampler.timesteps) // 2
        x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        traj = sampler.sample(toy_model, x_T=x_t, start_step=k, generator=torch.Generator().manual_seed(0),
                              return_trajectory=True)
        assert traj.timesteps == [t.item() for t in sampler.timesteps[k:]] and torch.equal(traj.xs[0], x_t)
        assert traj.nfe == sampler.nfe(k)
        seen = []
        pinned = torch.zeros(1, 4, 4)

        def hook(i, t_prev, x):
            seen.append(i)
            return torch.cat([pinned[None], x[1:]])

        traj = sampler.sample(toy_model, x_T=x_t, on_step=hook, generator=torch.Generator().manual_seed(0),
                              return_trajectory=True)
        assert seen == list(range(len(sampler.timesteps)))
        assert all(torch.equal(x[0], pinned) for x in traj.xs[1:]) and torch.equal(traj.sample[0], pinned)
        with pytest.raises(ValueError, match="start_step"):
            sampler.sample(toy_model, x_T=x_t, start_step=len(sampler.timesteps))

    @pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
    def test_gaussian_oracle_mean(self, name, kwargs, prediction_type):
        """With the exact denoiser for N(mu, sigma^2) data, every sampler lands on the data mean."""
        schedule = get_schedule("linear", T)
        sampler = get_sampler(name, schedule, progress=False, prediction_type=prediction_type, **kwargs)
        x = sampler.sample(gaussian_denoiser(schedule, 0.5, 0.3, prediction_type), shape=(4000, 1, 2, 2),
                           generator=torch.Generator().manual_seed(0))
        assert x.mean().item() == pytest.approx(0.5, abs=0.01)


GAUSSIAN_FULL_CASES = [
    ("ddpm", {}), ("ddpm", {"variance_type": "fixed_large"}),
    ("ddim", {"steps": T, "eta": 0.0}), ("ddim", {"steps": T, "eta": 1.0}),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("name,kwargs", GAUSSIAN_FULL_CASES)
def test_gaussian_oracle_full_chain(name, kwargs, prediction_type):
    """Over all T steps the discretisation error vanishes: samples have the data's mean and std."""
    schedule = get_schedule("linear", T)
    mu, sigma = 0.5, 0.3
    sampler = get_sampler(name, schedule, progress=False, prediction_type=prediction_type, **kwargs)
    x = sampler.sample(gaussian_denoiser(schedule, mu, sigma, prediction_type), shape=(4000, 1, 2, 2),
                       generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gaussian_error_shrinks_with_steps(eta):
    """Few-step DDIM under-disperses (Euler error on the probability-flow ODE); more steps fix it."""
    schedule = get_schedule("linear", T)
    sigma = 0.3
    model_fn = gaussian_denoiser(schedule, 0.5, sigma, "epsilon")
    errors = []
    for steps in (10, 50, 200):
        x = get_sampler("ddim", schedule, steps=steps, eta=eta, progress=False).sample(
            model_fn, shape=(4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
        errors.append(abs(x.std().item() / sigma - 1))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def pinned_ddim(steps, spacing):
    return DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing,
                         prediction_type="epsilon")


@pytest.mark.parametrize("steps,spacing", [(50, "leading"), (10, "leading"), (20, "trailing"), (50, "trailing")])
def test_ddim_timesteps_match_diffusers(steps, spacing):
    ref = pinned_ddim(steps, spacing)
    ref.set_timesteps(steps)
    assert torch.equal(spaced_timesteps(DiscretePath(get_schedule("linear", T)), steps, spacing), ref.timesteps.long())


@pytest.mark.parametrize("steps,spacing,eta", [(50, "leading", 0.0), (20, "trailing", 0.0), (25, "leading", 0.5)])
def test_ddim_trajectory_matches_diffusers(steps, spacing, eta):
    """Same noise, same model: every intermediate x_t agrees with diffusers' DDIMScheduler."""
    schedule = get_schedule("linear", T)
    ours = DDIMSampler(schedule, steps=steps, eta=eta, timestep_spacing=spacing, progress=False)
    ref = pinned_ddim(steps, spacing)
    ref.set_timesteps(steps)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = ours.sample(toy_model, x_T=x_T, generator=torch.Generator().manual_seed(7), return_trajectory=True)
    x, gen = x_T.clone(), torch.Generator().manual_seed(7)
    for i, t in enumerate(ref.timesteps):
        assert torch.allclose(traj.xs[i], x, atol=1e-5), f"step {i} (t={int(t)})"
        out = toy_model(x, torch.full((4,), int(t)))
        x = ref.step(out, t, x, eta=eta, generator=gen).prev_sample
    assert torch.allclose(traj.sample, x, atol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_trajectory_matches_diffusers(variance_type):
    schedule = get_schedule("linear", T)
    ours = DDPMSampler(schedule, variance_type=variance_type, progress=False)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        clip_sample=False, variance_type=variance_type, prediction_type="epsilon")
    ref.set_timesteps(T)
    model_fn = gaussian_denoiser(schedule, 0.5, 0.3, "epsilon")  # stays bounded over 1000 steps
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ours_out = ours.sample(model_fn, x_T=x_T, generator=torch.Generator().manual_seed(3))
    x, gen = x_T.clone(), torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x = ref.step(model_fn(x, torch.full((2,), int(t))), t, x, generator=gen).prev_sample
    assert torch.allclose(ours_out, x, atol=1e-4)


def test_linspace_uses_actual_previous_timestep():
    """With uneven spacing the update must target the next timestep in the list, not t - T//steps."""
    schedule = get_schedule("linear", T)
    sampler = DDIMSampler(schedule, steps=7, timestep_spacing="linspace", progress=False)
    ts = sampler.timesteps.tolist()
    assert ts[0] == T - 1 and ts[-1] == 0 and len(ts) == 7
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(x)
    abar = schedule.alphas_cumprod
    t, t_prev = ts[0], ts[1]
    x_prev, x0 = sampler.step(sampler.denoiser(lambda x, t: eps), x, t, t_prev)
    expected_x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
    assert torch.allclose(x0, expected_x0.float())
    assert torch.allclose(x_prev, (abar[t_prev].sqrt() * expected_x0 + (1 - abar[t_prev]).sqrt() * eps).float(),
                          atol=1e-6)


def test_clip_sample_bounds_x0():
    sampler = DDIMSampler(get_schedule("linear", T), steps=10, clip_sample=True, progress=False)
    traj = sampler.sample(lambda x, t: -5 * x, shape=(2, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                          return_trajectory=True)
    assert all(x0.abs().max() <= 1 for x0 in traj.x0s)


def test_bad_settings():
    s = get_schedule("linear", T)
    with pytest.raises(ValueError, match="sampler.steps must be a positive integer"):
        DDIMSampler(s, steps=0)
    with pytest.raises(ValueError, match="exceeds"):
        DDIMSampler(s, steps=2000)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(s, eta=1.5)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMSampler(s, timestep_spacing="middle")
    with pytest.raises(ValueError, match="variance_type"):
        DDPMSampler(s, variance_type="learned")
    with pytest.raises(ValueError, match="not a known sampler"):
        get_sampler("lms", s)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DDIMSampler(get_schedule("linear", T, rescale_zero_terminal_snr=True), prediction_type="epsilon",
                    timestep_spacing="trailing")


class HalfStepDDIM(DDIMSampler):
    """A sampler written only against the loop contract: deterministic DDIM that visits the midpoint between
    two timesteps (a float t) with a second model call, keeping the count of steps in ``state``."""

    def nfe(self, start_step=0):
        return 2 * (len(self.timesteps) - start_step) - 1

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        state["steps"] = state.get("steps", 0) + 1
        if t_prev < 0:
            return super().step(denoiser, x_t, t, t_prev, generator, state)
        mid = (t + t_prev) / 2 + 0.5
        x_mid, _ = super().step(denoiser, x_t, t, mid, generator, state)
        return super().step(denoiser, x_mid, mid, t_prev, generator, state)


def test_loop_contract_allows_two_calls_per_step_and_float_times():
    schedule = get_schedule("linear", T)
    seen_t = []

    def model_fn(x, t):
        seen_t.append(t[0].item())
        return gaussian_denoiser(schedule, 0.5, 0.3, "epsilon")(x, t.round().long())

    sampler = HalfStepDDIM(schedule, steps=10, progress=False)
    traj = sampler.sample(model_fn, shape=(2000, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                          return_trajectory=True)
    assert traj.nfe == 19 == sampler.nfe() and any(not float(t).is_integer() for t in seen_t)
    assert traj.sample.mean().item() == pytest.approx(0.5, abs=0.02)


def test_alpha_bar_at_interpolates_log_sigma():
    abar = get_schedule("cosine", T).alphas_cumprod
    assert alpha_bar_at(abar, 500.0).item() == pytest.approx(abar[500].item(), rel=1e-12)
    mid = alpha_bar_at(abar, 500.5).item()
    sigma = lambda a: ((1 - a) / a) ** 0.5  # noqa: E731
    expected = (sigma(abar[500].item()) * sigma(abar[501].item())) ** 0.5  # geometric mean of the sigmas
    assert sigma(mid) == pytest.approx(expected, rel=1e-10)
    assert abar[501].item() < mid < abar[500].item()
    zero_terminal = get_schedule("linear", T, rescale_zero_terminal_snr=True).alphas_cumprod
    assert alpha_bar_at(zero_terminal, T - 2.0).item() == zero_terminal[-2].item() > 0
    between = alpha_bar_at(zero_terminal, T - 1.5).item()  # towards an infinite sigma: 0, never NaN
    assert alpha_bar_at(zero_terminal, T - 1.0).item() == 0.0 and 0.0 <= between <= zero_terminal[-2].item()


def test_registry_is_the_source_of_sampler_names():
    assert isinstance(get_sampler("ddim", get_schedule("linear", T)), Sampler)
    assert set(SAMPLERS) >= {"ddim", "ddpm"}


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "heun"])
def test_observe_sees_each_step_and_changes_nothing(name):
    """``observe(i, t, x_t, x0)`` is called once per step with that step's input and predicted x0 (the ones a
    trajectory records) and leaves the samples bit-identical."""
    schedule = get_schedule("linear", 1000)
    sampler = SAMPLERS[name](schedule, steps=6, progress=False)
    seen = []
    observed = sampler.sample(toy_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                              observe=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0.clone())))
    traj = sampler.sample(toy_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert torch.equal(observed, traj.sample)
    assert [s[0] for s in seen] == list(range(len(traj.timesteps))) and [s[1] for s in seen] == traj.timesteps
    assert all(torch.equal(s[2], x) and torch.equal(s[3], x0) for s, x, x0 in zip(seen, traj.xs, traj.x0s))
