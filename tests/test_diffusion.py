"""Gaussian paths and predictions: formulas, inverses, and the one conversion to (x0, eps) on every path."""
import math

import numpy as np
import pytest
import torch

from diffexp.diffusion import PREDICTIONS, SAMPLER_PREDICTIONS, EDMPrediction, get_prediction, to_x0_eps
from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath, as_path
from diffexp.schedules import get_schedule

T = 1000


def paths():
    return {"ddpm_linear": DiscretePath(get_schedule("linear", T)), "ddpm_cosine": DiscretePath(get_schedule("cosine", T)),
            "cosine": CosinePath(), "edm": EDMPath(), "flow": FlowPath()}


def interior_times(path, n=7):
    """Times strictly inside the path's range (alpha > 0 and sigma > 0)."""
    lo, hi = path.t_min, path.t_max
    return torch.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n, dtype=torch.float64)


def test_path_formulas():
    f = lambda u, s=0.008: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    cos = CosinePath()
    for t in (0.1, 0.5, 0.93):
        alpha, sigma = cos.alpha_sigma(t)
        assert alpha == pytest.approx(math.sqrt(f(t) / f(0)), rel=1e-12)
        assert sigma == pytest.approx(math.sqrt(1 - f(t) / f(0)), rel=1e-12)
    assert cos.alpha_sigma(1.0) == (0.0, 1.0) and cos.alpha_sigma(0.0) == (1.0, 0.0)
    assert CosinePath(s=0.0).alpha_sigma(0.5)[0] == pytest.approx(math.cos(math.pi / 4), rel=1e-12)
    assert EDMPath().alpha_sigma(3.5) == (1.0, 3.5)
    assert FlowPath().alpha_sigma(0.25) == (0.75, 0.25)
    discrete = DiscretePath(get_schedule("linear", T))
    abar = get_schedule("linear", T).alphas_cumprod
    assert discrete.alpha_sigma(500) == (abar[500].item() ** 0.5, (1 - abar[500].item()) ** 0.5)
    assert discrete.alpha_sigma(discrete.clean_time) == (1.0, 0.0)
    assert (discrete.t_min, discrete.t_max, discrete.clean_time) == (0.0, 999.0, -1.0)


@pytest.mark.parametrize("name", paths())
def test_log_snr_inverse_and_derived_quantities(name):
    path = paths()[name]
    t = interior_times(path)
    lam = torch.tensor([2 * path.half_log_snr(float(x)) for x in t], dtype=torch.float64)
    assert torch.allclose(path.time_at_log_snr(lam), t, rtol=1e-6, atol=1e-6 * path.t_max)
    for x in t.tolist():
        alpha, sigma = path.alpha_sigma(x)
        assert path.variance(x) == pytest.approx(sigma**2, rel=1e-12)
        assert path.ve_sigma(x) == pytest.approx(sigma / alpha, rel=1e-12)
        assert path.half_log_snr(x) == pytest.approx(math.log(alpha / sigma), rel=1e-9, abs=1e-12)
        assert float(path.time_at_ve_sigma(sigma / alpha)) == pytest.approx(x, rel=1e-6, abs=1e-6 * path.t_max)
        if path.variance_preserving:
            assert alpha**2 + sigma**2 == pytest.approx(1.0, abs=1e-12)
    s, u = t[1].item(), t[4].item()  # the forward transition composes with the marginal
    a, v = path.transition(s, u)
    (alpha_s, sigma_s), (alpha_u, sigma_u) = path.alpha_sigma(s), path.alpha_sigma(u)
    assert a * alpha_s == pytest.approx(alpha_u, rel=1e-12) and v + a**2 * sigma_s**2 == pytest.approx(sigma_u**2, rel=1e-10)
    snr = path.snr(t)
    assert torch.allclose(snr.double(), torch.exp(lam), rtol=1e-5)


@pytest.mark.parametrize("name", paths())
def test_noised_is_the_marginal_and_renoised_the_transition(name):
    path = paths()[name]
    x0 = torch.randn(20000, generator=torch.Generator().manual_seed(0)).double() * 0.5 + 0.2
    t = interior_times(path, 3)[1].item()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha, sigma = path.alpha_sigma(t)
    assert torch.allclose(path.noised(x0, t, noise), alpha * x0 + sigma * noise, rtol=1e-10, atol=1e-12)
    later = interior_times(path, 3)[2].item()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_later = path.renoised(path.noised(x0, t, noise), t, later, z)  # q(x_later | x_t) q(x_t | x0) = q(x_later | x0)
    alpha_l, sigma_l = path.alpha_sigma(later)
    residual = (x_later - alpha_l * x0) / sigma_l
    assert residual.mean().item() == pytest.approx(0, abs=0.03) and residual.std().item() == pytest.approx(1, rel=0.02)


def test_discrete_path_matches_the_table_and_refuses_sigmas_beyond_it():
    schedule = get_schedule("linear", T)
    path = as_path(schedule)
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = path.coefficients(t, torch.zeros(4, 1, 2, 2))
    abar = schedule.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    assert torch.equal(alpha, abar.sqrt()) and torch.equal(sigma, (1 - abar).sqrt())  # float32, as DDPM's code
    assert torch.equal(path.snr(t), schedule.snr.float()[t])
    assert torch.equal(path.noise_input(t), t)  # the net sees the timestep itself: old checkpoints unchanged
    sigma_min, sigma_max = path.ve_sigma_range()
    with pytest.raises(ValueError, match="outside this 1000-step schedule's range"):
        path.time_at_ve_sigma(0.002)  # EDM's sigma_min is below this table's smallest sigma
    assert float(path.time_at_ve_sigma(0.002, clamp=True)) == 0.0
    assert float(EDMPath().time_at_ve_sigma(0.002)) == pytest.approx(0.002)  # ...which EDM's path reaches
    assert float(path.time_at_ve_sigma(sigma_max)) == pytest.approx(999.0)


@pytest.mark.parametrize("prediction_type", SAMPLER_PREDICTIONS)
@pytest.mark.parametrize("name", paths())
def test_prediction_round_trip_on_every_path(name, prediction_type):
    """target(x0, eps) converted back by to_x0_eps gives (x0, eps) on every path."""
    path = paths()[name]
    g = torch.Generator().manual_seed(0)
    t = interior_times(path)
    x0 = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    alpha, sigma = path.coefficients(t, x0)
    x_t = path.noised(x0, t, eps)
    prediction = get_prediction(prediction_type)
    target = prediction.target(x0, eps, x_t, alpha, sigma)
    x0_hat, eps_hat = to_x0_eps(target, x_t, alpha, sigma, prediction.sampler_type, path.variance_preserving)
    assert torch.allclose(x0_hat, x0, atol=1e-7) and torch.allclose(eps_hat, eps, atol=1e-7)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "velocity": eps - x0}
    assert torch.allclose(target, expected[prediction_type])


@pytest.mark.parametrize("prediction_type", sorted(PREDICTIONS))
@pytest.mark.parametrize("name", paths())
def test_error_scale_relates_raw_and_x0_errors(name, prediction_type):
    """||raw error||^2 = c ||x0 error||^2 at a fixed x_t: perturb the raw output, compare the x0 it implies."""
    path = paths()[name]
    t = interior_times(path, 5)
    prediction = get_prediction(prediction_type)
    x_t = torch.randn(len(t), 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha, sigma = path.coefficients(t, x_t)
    raw = torch.randn_like(x_t)
    delta = 1e-3 * torch.randn_like(x_t)

    def x0_of(out):
        pred = prediction.output(out, x_t, alpha, sigma)
        return to_x0_eps(pred, x_t, alpha, sigma, prediction.sampler_type, path.variance_preserving)[0]

    ratio = delta.pow(2).flatten(1).sum(1) / (x0_of(raw + delta) - x0_of(raw)).pow(2).flatten(1).sum(1)
    scale = prediction.error_scale(path.snr(t).double(), alpha.flatten(), sigma.flatten(), path.variance_preserving)
    assert torch.allclose(scale.double(), ratio, rtol=1e-4)


def test_edm_preconditioning_follows_table_1_and_diffusers():
    """c_skip, c_out, c_in of Karras et al. (2022, Table 1) and diffusers' EDMEulerScheduler; c_noise = ln(sigma)/4."""
    from diffusers import EDMEulerScheduler

    sd = 0.5
    edm = EDMPrediction(sd)
    path = EDMPath()
    sigmas = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha, sigma = path.coefficients(sigmas, x)
    c_skip, c_out, c_in = edm.scalings(alpha, sigma)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(c_skip, sd**2 / (s**2 + sd**2)) and torch.allclose(c_out, s * sd / (s**2 + sd**2).sqrt())
    assert torch.allclose(c_in, 1 / (s**2 + sd**2).sqrt())
    assert torch.allclose(path.noise_input(sigmas), 0.25 * sigmas.log())
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=sd, prediction_type="epsilon")
    F_out = torch.randn_like(x)
    for i, value in enumerate(sigmas.tolist()):
        assert torch.allclose(edm.net_input(x, alpha, sigma)[i], ref.precondition_inputs(x[i], value))
        assert torch.allclose(edm.output(F_out, x, alpha, sigma)[i], ref.precondition_outputs(x[i], F_out[i], value))
        assert ref.precondition_noise(value).item() == pytest.approx(path.noise_input(sigmas[i]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrediction(0)


def test_velocity_is_the_flow_paths_time_derivative():
    """On the flow path u = eps - x0 = dx_t/dt."""
    path = FlowPath()
    x0, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    h = 1e-6
    derivative = (path.noised(x0, 0.4 + h, eps) - path.noised(x0, 0.4 - h, eps)) / (2 * h)
    assert torch.allclose(derivative, get_prediction("velocity").target(x0, eps, None, None, None), atol=1e-8)


def test_bad_input():
    with pytest.raises(ValueError, match="prediction_type='x0'.*epsilon"):
        get_prediction("x0")
    with pytest.raises(ValueError, match="t_min < t_max"):
        FlowPath(t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="sigma_min must be positive|t_min < t_max"):
        EDMPath(sigma_min=0.0)
    with pytest.raises(ValueError, match="cosine offset"):
        CosinePath(s=1.5)
    with pytest.raises(ValueError, match="noise schedule"):
        DiscretePath("linear")
    np.testing.assert_equal(float(CosinePath().time_at_log_snr(torch.tensor(math.inf))), 0.0)
