"""Every sampler on every Gaussian path with every prediction type: with the exact denoiser of Gaussian data
N(mu, s^2) samples reach the data's mean and std; diffusers' flow-matching Euler scheduler and EDM's samplers as
oracles."""
import math

import pytest
import torch

from diffexp.diffusion import SAMPLER_PREDICTIONS
from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath
from diffexp.samplers import SAMPLERS, EDMSampler, EulerSampler, get_sampler, spaced_timesteps
from diffexp.schedules import get_schedule

MU, S = 0.5, 0.3


def path_named(name: str, for_epsilon: bool = False):
    """The paths under test; epsilon prediction cannot start at alpha = 0, so its continuous paths stop short."""
    end = 0.999 if for_epsilon else 1.0
    return {"ddpm": DiscretePath(get_schedule("linear", 1000)), "cosine": CosinePath(t_max=end),
            "edm": EDMPath(), "flow": FlowPath(t_max=end)}[name]


def gaussian_model(path, prediction_type, mu=MU, s=S):
    """The exact prediction for data N(mu, s^2) on ``path``: x0_hat = E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) /
    (alpha^2 s^2 + sigma^2), eps_hat = (x_t - alpha x0_hat) / sigma, in the form of ``prediction_type``."""

    def model_fn(x, t):
        alpha, sigma = path.coefficients(t.double() if t.is_floating_point() else t, x.double())
        xd = x.double()
        x0 = mu + alpha * s**2 * (xd - alpha * mu) / (alpha**2 * s**2 + sigma**2)
        eps = (xd - alpha * x0) / sigma
        out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "velocity": eps - x0}
        return out[prediction_type].to(x.dtype)

    return model_fn


# the consistency sampler expects a consistency function, not a denoiser (test_distill.py gives it its oracle)
CASES = [(path, prediction, sampler) for path in ("ddpm", "cosine", "edm", "flow") for prediction in SAMPLER_PREDICTIONS
         for sampler in sorted(SAMPLERS) if sampler != "consistency"]


@pytest.mark.parametrize("path_name,prediction_type,name", CASES)
def test_gaussian_oracle_on_every_path(path_name, prediction_type, name):
    path = path_named(path_name, for_epsilon=prediction_type == "epsilon")
    steps = {"ddpm": 200, "euler_ancestral": 200, "heun": 25, "edm": 25}.get(name, 50)  # first-order ones under-disperse
    sampler = get_sampler(name, path, prediction_type=prediction_type, progress=False, steps=steps)
    x = sampler.sample(gaussian_model(path, prediction_type), shape=(4000, 1, 1, 1),
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.12)


@pytest.mark.parametrize("path_name", ["ddpm", "cosine", "edm", "flow"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "heun", "ddpm"])
def test_converged_samplers_reach_the_data_std(path_name, name):
    """With enough steps the discretisation error vanishes: the data's std to 2 %."""
    path = path_named(path_name)
    steps = {"ddpm": 1000, "heun": 40}.get(name, 50)
    sampler = get_sampler(name, path, prediction_type="v_prediction", steps=steps, progress=False)
    x = sampler.sample(gaussian_model(path, "v_prediction"), shape=(8000, 1, 1, 1),
                       generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.std().item() == pytest.approx(S, rel=0.02)


def test_epsilon_cannot_start_from_pure_noise():
    with pytest.raises(ValueError, match="alpha = 0"):
        get_sampler("euler", FlowPath(), prediction_type="epsilon")
    with pytest.raises(ValueError, match="finite largest sigma"):
        get_sampler("dpmpp_2m", FlowPath(), prediction_type="velocity", timestep_spacing="karras")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers_flow_match_euler_step_for_step(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler (with SD3's shift) is Euler on the flow path: the same sigmas
    (uniform, then shifted) and the same x after every step, the model seeing 1000 t (its timesteps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, path = 12, FlowPath()
    sampler = EulerSampler(path, steps=steps, prediction_type="velocity", timestep_spacing="shifted", shift=shift,
                           progress=False)
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = torch.linspace(1.0, path.t_min, steps, dtype=torch.float64)  # our shifted spacing, before the shift
    sch.set_timesteps(sigmas=unshifted.numpy())
    torch.testing.assert_close(sampler.timesteps.float(), sch.sigmas[:-1], rtol=1e-6, atol=1e-7)

    def net(x, noise_input):  # a smooth stand-in for a network, called with the net's noise input
        return 0.8 * torch.tanh(x) + 1e-3 * noise_input.view(-1, 1, 1, 1) * x

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = sampler.sample(lambda x, t: net(x, path.noise_input(t)), x_T=x_T, return_trajectory=True)
    x = x_T.clone()
    for i, t in enumerate(sch.timesteps):
        torch.testing.assert_close(traj.xs[i], x, rtol=1e-5, atol=1e-5)
        x = sch.step(net(x, t.expand(len(x))), t, x).prev_sample
    torch.testing.assert_close(traj.sample, x, rtol=1e-5, atol=1e-5)


def edm_algorithm_2(D, x_T, sigmas, S_churn, S_tmin, S_tmax, S_noise, generator):
    """Karras et al. (2022), Algorithm 2, transcribed from the paper for this test (VE: x at sigma; D(x, sigma) -> x0).
    Noise is drawn in the same order as diffexp's sampler (one z per churned step)."""
    N = len(sigmas)
    t = list(sigmas) + [0.0]
    x = x_T * t[0]
    for i in range(N):
        gamma = min(S_churn / N, 2**0.5 - 1) if S_tmin <= t[i] <= S_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        if gamma > 0:
            x = x + (t_hat**2 - t[i] ** 2) ** 0.5 * S_noise * torch.randn(x.shape, generator=generator)
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_next = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_edm_sampler_is_algorithm_2(churn):
    """diffexp's EDM sampler on EDM's path is Algorithm 2 (Heun with churn; S_churn = 0: Algorithm 1), with the
    Karras sigmas of EDM's defaults (0.002..80, rho 7), at 2N - 1 evaluations."""
    path = EDMPath()
    settings = dict(S_churn=churn, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)
    sampler = EDMSampler(path, steps=10, prediction_type="sample", progress=False, **settings)
    sigmas = spaced_timesteps(path, 10, "karras")
    rho = 7.0
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected_sigmas = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    torch.testing.assert_close(sigmas, expected_sigmas)
    D = lambda x, sigma: 0.9 * torch.tanh(x / (1 + sigma)) + 0.01 * math.log(sigma)  # noqa: E731
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(lambda x, t: D(x, float(t[0])), x_T=x_T, generator=torch.Generator().manual_seed(4),
                          return_trajectory=True)
    reference = edm_algorithm_2(D, x_T, sigmas.tolist(), generator=torch.Generator().manual_seed(4), **settings)
    torch.testing.assert_close(ours.sample, reference, rtol=1e-5, atol=1e-5)
    assert ours.nfe == sampler.nfe() == 19


def test_edm_euler_matches_diffusers_edm_euler_scheduler():
    """Euler in sigma on EDM's path with the preconditioned model against diffusers' EDMEulerScheduler."""
    from diffusers import EDMEulerScheduler

    from diffexp.diffusion import get_prediction

    path, edm = EDMPath(), get_prediction("edm", 0.5)
    sch = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type="epsilon")
    sch.set_timesteps(8)
    sampler = EulerSampler(path, steps=8, prediction_type="sample", progress=False)
    torch.testing.assert_close(sampler.timesteps, sch.sigmas[:-1].double(), rtol=1e-6, atol=1e-9)

    def F_net(x_in, c_noise):
        return 0.5 * torch.tanh(x_in) + 0.1 * c_noise.view(-1, 1, 1, 1)

    model_fn = edm.model_fn(F_net, path)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(model_fn, x_T=x_T)
    x = x_T * sch.init_noise_sigma
    for t in sch.timesteps:
        model_input = sch.scale_model_input(x, t)
        x = sch.step(F_net(model_input, t.expand(len(x)).float()), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
