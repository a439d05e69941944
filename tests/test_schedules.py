import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffexp.schedules import SCHEDULES, get_schedule

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}


def test_formulas():
    lin = get_schedule("linear", T)
    assert torch.allclose(lin.betas, torch.linspace(1e-4, 0.02, T, dtype=torch.float64))
    quad = get_schedule("quadratic", T, beta_start=1e-4, beta_end=0.02)
    assert quad.betas[0].item() == pytest.approx(1e-4) and quad.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(quad.betas.sqrt().diff(), torch.full((T - 1,), (0.02**0.5 - 0.01) / (T - 1),
                                                               dtype=torch.float64))
    cos = get_schedule("cosine", T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 998):
        assert cos.betas[i].item() == pytest.approx(min(1 - f((i + 1) / T) / f(i / T), 0.999), rel=1e-12)
    assert cos.betas[-1].item() == 0.999  # the clip bites at the end
    # abar_t = f(t+1)/f(0) wherever no beta was clipped
    assert cos.alphas_cumprod[500].item() == pytest.approx(f(501 / T) / f(0), rel=1e-10)
    sig = get_schedule("sigmoid", T)
    x = -6 + 12 * 250 / (T - 1)
    assert sig.betas[250].item() == pytest.approx(1 / (1 + math.exp(-x)) * (0.02 - 1e-4) + 1e-4, rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_properties(name):
    s = get_schedule(name, 200)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (200,)
    assert s.alphas_cumprod.dtype == torch.float64
    assert torch.all(s.alphas_cumprod.diff() < 0)
    assert torch.allclose(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_matches_diffusers(name, zero_snr):
    ours = get_schedule(name, T, rescale_zero_terminal_snr=zero_snr)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], beta_start=1e-4, beta_end=0.02,
                        rescale_betas_zero_snr=zero_snr)
    # diffusers computes in float32; the zero-SNR betas are ratios abar_t/abar_{t-1} of nearby float32
    # numbers, so its round-off there is ~1e-4 relative
    assert torch.allclose(ours.betas.float(), ref.betas, rtol=2e-3 if zero_snr else 1e-5, atol=1e-7)
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-6)


def test_zero_terminal_snr():
    s = get_schedule("linear", T, rescale_zero_terminal_snr=True)
    base = get_schedule("linear", T)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-15)
    assert s.snr[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule.name='bogus'.*linear"):
        get_schedule("bogus")
    with pytest.raises(ValueError, match="num_timesteps"):
        get_schedule("linear", 0)
    with pytest.raises(ValueError, match="beta_start"):
        get_schedule("linear", 10, beta_start=0.1, beta_end=0.01)
