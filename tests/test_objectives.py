"""Each training objective's loss on a fixed batch equals its formula computed here independently; DDPM's is bit for
bit the discrete-time code's."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffexp.diffusion import get_prediction
from diffexp.objectives import (EDMWeighting, LogitNormal, LogNormal, MinSNR, NoWeighting, Objective, SigmoidWeighting,
                                Uniform, UniformTimesteps)
from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath
from diffexp.schedules import get_schedule

N = 4096


def fixed_net(x, noise_input):
    """A deterministic stand-in for a network that depends on both inputs."""
    return 0.3 * torch.tanh(x) + 0.01 * torch.sin(noise_input.float()).view(-1, 1, 1, 1)


def batch(n=6, seed=0):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", None), ("epsilon", 5.0), ("v_prediction", 5.0),
                                                   ("sample", 5.0), ("v_prediction", None)])
def test_ddpm_loss_is_the_discrete_time_codes_bit_for_bit(prediction_type, gamma):
    """The discrete-time code's loss (DiffusionModel.loss before the continuous-time core), written out: t ~ U{0..T-1},
    eps, x_t from the float32 table, the target, the MSE per item, min-SNR-gamma per prediction type."""
    schedule = get_schedule("cosine", 1000)
    x0 = batch()
    objective = Objective(DiscretePath(schedule), get_prediction(prediction_type), UniformTimesteps(),
                          MinSNR(gamma) if gamma else None)
    ours = objective.loss(fixed_net, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    alphas_cumprod, snr = schedule.alphas_cumprod.float(), schedule.snr.float()
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, dtype=x0.dtype, generator=g)
    abar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = {"epsilon": noise, "sample": x0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction_type]
    per_sample = F.mse_loss(fixed_net(x_t, t), target, reduction="none").flatten(1).mean(1)
    if gamma:
        s = snr[t]
        clipped = torch.clamp(s, max=gamma)
        weight = {"epsilon": torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), torch.ones_like(s)),
                  "v_prediction": clipped / (s + 1), "sample": clipped}[prediction_type]
        per_sample = per_sample * weight
    assert torch.equal(ours, per_sample.mean())


def test_edm_loss_is_edms():
    """EDM (Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), n = sigma eps, D = c_skip y + c_out F(c_in y, ln(sigma)/4),
    lambda(sigma) ||D - y||^2 (NVlabs' EDMLoss, element mean); equal to the unit-weighted loss on F."""
    sd, x0 = 0.5, batch()
    objective = Objective(EDMPath(), get_prediction("edm", sd), LogNormal(-1.2, 1.2), EDMWeighting(sd))
    ours = objective.loss(fixed_net, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(len(x0), generator=g, dtype=torch.float64)).view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    y = x0 + sigma * noise
    c_skip, c_out, c_in = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sigma**2 + sd**2).sqrt()
    D = c_skip * y + c_out * fixed_net(c_in * y, (0.25 * sigma.log()).flatten())
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    expected = (weight * (D - x0) ** 2).flatten(1).mean(1).mean()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_flow_matching_loss_is_sd3s():
    """Rectified flow with SD3's logit-normal (m, s) and shift: u = sigmoid(m + s n), t = shift u / (1 + (shift-1) u),
    x_t = (1 - t) x0 + t eps, ||F(x_t, 1000 t) - (eps - x0)||^2."""
    m, s, shift, x0 = 0.3, 0.8, 2.0, batch()
    objective = Objective(FlowPath(), get_prediction("velocity"), LogitNormal(m, s, shift))
    ours = objective.loss(fixed_net, x0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(m + s * torch.randn(len(x0), generator=g, dtype=torch.float64))
    t = (shift * u / (1 + (shift - 1) * u)).float().view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    x_t = (1 - t) * x0 + t * noise
    expected = F.mse_loss(fixed_net(x_t, 1000 * t.flatten()), noise - x0, reduction="none").flatten(1).mean(1).mean()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cosine_v_loss_with_sigmoid_weighting():
    """Continuous VP, t ~ U[0, 1], v target, Kingma & Gao's sigmoid(b - lambda) on the eps error: on the v error it is
    sigmoid(b - lambda) SNR / (SNR + 1) = sigmoid(b - lambda) alpha^2."""
    bias, x0, path = -1.0, batch(), CosinePath()
    objective = Objective(path, get_prediction("v_prediction"), Uniform(), SigmoidWeighting(bias))
    ours = objective.loss(fixed_net, x0, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    t = torch.rand(len(x0), generator=g, dtype=torch.float64)
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha2 = f(t) / f(torch.zeros(()))
    alpha, sigma = alpha2.sqrt().view(-1, 1, 1, 1), (1 - alpha2).sqrt().view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    x_t = alpha * x0 + sigma * noise
    per_item = F.mse_loss(fixed_net(x_t.float(), 1000 * t), (alpha * noise - sigma * x0).float(),
                          reduction="none").flatten(1).mean(1)
    lam = torch.log(alpha2 / (1 - alpha2))
    expected = (per_item * torch.sigmoid(bias - lam) * alpha2).mean()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-4)


def test_min_snr_on_the_velocity_of_a_flow_path():
    """min(SNR, g) on the x0 error is min(SNR, g) sigma^2 / (alpha + sigma)^2 on the velocity error."""
    path = FlowPath()
    objective = Objective(path, get_prediction("velocity"), Uniform(), MinSNR(2.0))
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    alpha, sigma = path.coefficients(t, torch.zeros(3, 1))
    weights = objective.weights(t, alpha, sigma)
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(weights.double(), torch.clamp(snr, max=2.0) * t**2, rtol=1e-6)


@pytest.mark.parametrize("density,path", [(LogitNormal(0.0, 1.0), FlowPath()), (LogNormal(-1.2, 1.2), EDMPath()),
                                          (Uniform(), CosinePath()), (UniformTimesteps(), DiscretePath(get_schedule("linear", 100)))])
def test_densities_draw_their_distributions(density, path):
    t = density.sample(N, path, torch.Generator().manual_seed(0), "cpu")
    if isinstance(density, LogitNormal):  # logit(t) ~ N(0, 1)
        z = torch.logit(t)
        assert z.mean().item() == pytest.approx(0, abs=0.05) and z.std().item() == pytest.approx(1, rel=0.05)
    elif isinstance(density, LogNormal):  # ln sigma ~ N(-1.2, 1.2^2), not clamped to [sigma_min, sigma_max]
        z = t.log()
        assert z.mean().item() == pytest.approx(-1.2, abs=0.06) and z.std().item() == pytest.approx(1.2, rel=0.05)
    elif isinstance(density, Uniform):
        assert t.min() >= 0 and t.max() <= 1 and t.mean().item() == pytest.approx(0.5, abs=0.02)
    else:
        assert t.dtype == torch.long and set(t.tolist()) == set(range(100))


def test_logit_normal_reaches_other_paths_through_log_snr():
    """On the discrete path the same log-SNR distribution: lambda = -2 (m + s n)."""
    path = DiscretePath(get_schedule("cosine", 1000))
    t = LogitNormal(0.0, 1.0).sample(N, path, torch.Generator().manual_seed(0), "cpu")
    lam = path.log_snr(t).double()
    inside = lam.abs() < 6
    assert lam[inside].mean().item() == pytest.approx(0, abs=0.1) and lam.std().item() == pytest.approx(2, rel=0.08)


def test_bad_settings():
    with pytest.raises(ValueError, match="density=uniform_timesteps draws a discrete path"):
        Objective(FlowPath(), get_prediction("velocity"), UniformTimesteps())
    with pytest.raises(ValueError, match="density.s must be a positive"):
        LogitNormal(s=0)
    with pytest.raises(ValueError, match="weighting.gamma must be a positive"):
        MinSNR(-1)
    assert Objective(EDMPath(), get_prediction("edm"), None, NoWeighting()).weighting is None
    assert isinstance(Objective(FlowPath(), get_prediction("velocity")).density, Uniform)
