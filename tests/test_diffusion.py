import pytest
import torch

from diffexp.diffusion import (PREDICTION_TYPES, diffusion_loss, min_snr_weight, prediction_to_x0_eps, q_sample,
                               training_target)
from diffexp.schedules import get_schedule


@pytest.fixture
def setup():
    s = get_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 900, 998])
    return s, x0, eps, t


def test_q_sample_formula(setup):
    s, x0, eps, t = setup
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(q_sample(x0, t, eps, s.alphas_cumprod), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_round_trip(setup, prediction_type):
    s, x0, eps, t = setup
    x_t = q_sample(x0, t, eps, s.alphas_cumprod)
    target = training_target(x0, eps, t, s.alphas_cumprod, prediction_type)
    x0_hat, eps_hat = prediction_to_x0_eps(target, x_t, t, s.alphas_cumprod, prediction_type)
    # the eps -> x0 division by sqrt(abar) amplifies float64 round-off at large t
    assert torch.allclose(x0_hat, x0, atol=1e-8)
    assert torch.allclose(eps_hat, eps, atol=1e-8)


def test_v_target(setup):
    s, x0, eps, t = setup
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = training_target(x0, eps, t, s.alphas_cumprod, "v_prediction")
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    assert torch.allclose(min_snr_weight(snr, "epsilon", 5.0), torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    assert torch.allclose(min_snr_weight(snr, "v_prediction", 5.0),
                          torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 51], dtype=torch.float64))
    assert torch.allclose(min_snr_weight(snr, "sample", 5.0), torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64))


def test_loss_weighting(setup):
    s, x0, eps, t = setup
    pred = torch.zeros_like(eps)
    plain = diffusion_loss(pred, eps, t, s.snr, "epsilon")
    assert plain.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)
    weighted = diffusion_loss(pred, eps, t, s.snr, "epsilon", min_snr_gamma=5.0)
    w = min_snr_weight(s.snr[t], "epsilon", 5.0)
    assert weighted.item() == pytest.approx((eps.pow(2).flatten(1).mean(1) * w).mean().item(), rel=1e-6)


def test_unknown_prediction_type(setup):
    s, x0, eps, t = setup
    with pytest.raises(ValueError, match="prediction_type='x0'.*epsilon"):
        training_target(x0, eps, t, s.alphas_cumprod, "x0")
