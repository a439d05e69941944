"""Image editing (diffexp.editing): SDEdit image-to-image, inpainting with RePaint, interpolation."""
from __future__ import annotations

import pytest
import torch

from diffexp.editing import edit, inpaint, interpolate
from diffexp.lit import DiffusionModel
from diffexp.nets import UNet
from diffexp.samplers import DDIMSampler
from diffexp.schedules import get_schedule


def model_with(prediction_type: str = "epsilon", **schedule) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), attention_levels=[-1], dropout=0.0)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised: give the net an output
    return DiffusionModel(net, get_schedule("linear", num_timesteps=100, **schedule), prediction_type=prediction_type)


def test_strength_zero_returns_the_input_and_one_is_sampling_from_noise():
    model = model_with("v_prediction", rescale_zero_terminal_snr=True)
    sampler = DDIMSampler(model.schedule, steps=10, timestep_spacing="trailing", prediction_type="v_prediction",
                          progress=False)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(edit(model, images, 0.0, sampler), images)
    edited = edit(model, images, 1.0, sampler, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    sampled = model.sample(3, sampler=sampler, x_T=noise)
    assert torch.equal(edited, sampled)  # abar at the first trailing timestep is 0: nothing of the image is left
    stochastic = DDIMSampler(model.schedule, steps=10, eta=1.0, timestep_spacing="trailing",
                             prediction_type="v_prediction", progress=False)
    first, again = (edit(model, images, 0.5, stochastic, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(first, again)  # every draw, in the steps too, comes from the generator


def test_strength_runs_the_last_steps_from_the_forward_noised_image():
    model = model_with()
    sampler = DDIMSampler(model.schedule, steps=10, progress=False)
    calls = []
    model.net.register_forward_hook(lambda module, args, out: calls.append(args[1][0].item()))
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    out = edit(model, images, 0.4, sampler, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.abs().max() <= 1
    assert calls == sampler.timesteps[6:].tolist()  # round(0.4 * 10) = 4 steps, the last four timesteps
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="strength must lie in"):
            edit(model, images, bad, sampler)


@pytest.mark.slow
def test_sample_py_edits_init_images(tiny_checkpoint, tmp_path):
    """sample.py init_image=FILE|DIR strength=...: n edits per image; strength 0 gives the input back."""
    import json

    import numpy as np
    from PIL import Image

    from tests.conftest import run_script

    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name)
    run_script("sample.py", f"ckpt={tiny_checkpoint}", f"init_image={folder / 'a.png'}", "strength=0", "n=2",
               "sampler.steps=4", f"out={tmp_path / 's0'}", cwd=tmp_path, check=True)
    same = np.load(tmp_path / "s0" / "samples.npz")["images"][..., 0]
    assert np.array_equal(same[0], np.asarray(Image.open(folder / "a.png"))) and np.array_equal(same[0], same[1])
    run_script("sample.py", f"ckpt={tiny_checkpoint}", f"init_image={folder}", "strength=0.5", "n=4",
               "sampler.steps=4", f"out={tmp_path / 's5'}", cwd=tmp_path, check=True)
    summary = json.loads((tmp_path / "s5" / "metrics.json").read_text())
    assert summary["strength"] == 0.5 and summary["nfe"] == 2  # the last 2 of 4 steps and (tmp_path / "s5" / "grid.png").is_file()
    edits = np.load(tmp_path / "s5" / "samples.npz")["images"]
    assert edits.shape == (4, 16, 16, 1) and not np.array_equal(edits[0], edits[1])
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask[:8, :8]).save(tmp_path / "small_mask.png")  # not the 16 x 16 of the init images
    run_script("sample.py", f"ckpt={tiny_checkpoint}", f"init_image={folder / 'b.png'}", f"mask={tmp_path / 'mask.png'}",
               "strength=1", "n=2", "sampler.steps=4", f"out={tmp_path / 'inpaint'}", cwd=tmp_path, check=True)
    filled = np.load(tmp_path / "inpaint" / "samples.npz")["images"][..., 0]
    original = np.asarray(Image.open(folder / "b.png"))
    assert (filled[:, mask == 0] == original[mask == 0]).all() and (filled[:, mask > 0] != original[mask > 0]).any()
    run_script("sample.py", f"ckpt={tiny_checkpoint}", f"init_image={folder / 'b.png'}", f"mask={tmp_path / 'mask.png'}",
               "n=1", "strength=1", "sampler.steps=4", "jump_length=2", "jump_n_sample=3", f"out={tmp_path / 'repaint'}",
               cwd=tmp_path, check=True)
    result = run_script("sample.py", f"ckpt={tiny_checkpoint}", f"init_image={folder / 'b.png'}",
                        f"mask={tmp_path / 'mask.png'}", "n=1", "sampler.steps=4", "jump_n_sample=2",
                        f"out={tmp_path / 'no_jump'}", cwd=tmp_path, check=True)  # default jump_length 10 > 4 steps
    assert "resamples nothing" in result.stderr
    assert json.loads((tmp_path / "no_jump" / "metrics.json").read_text())["strength"] == 1.0  # inpainting default
    summary = json.loads((tmp_path / "repaint" / "metrics.json").read_text())
    assert summary["nfe"] == 4 + 2 * 2 and summary["jump_n_sample"] == 3  # level 3 >= jump_length: redone twice
    repainted = np.load(tmp_path / "repaint" / "samples.npz")["images"][0, ..., 0]
    assert (repainted[mask == 0] == original[mask == 0]).all()
    for override, message in [("n=3", "multiple of the 2 init images"), ("strength=1.5", "strength"),
                              (f"init_image={tmp_path / 'none'}", "does not exist"),
                              ("jump_n_sample=0", "jump_n_sample"),
                              (f"mask={tmp_path / 'small_mask.png'}", "draw the mask at the size")]:
        args = [f"ckpt={tiny_checkpoint}", f"init_image={folder}", "n=2", override, f"out={tmp_path / 'bad'}"]
        result = run_script("sample.py", *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-800:]


def test_inpainting_keeps_the_known_pixels_exactly():
    model = model_with()
    sampler = DDIMSampler(model.schedule, steps=8, progress=False)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1  # regenerate the centre
    out = inpaint(model, images, mask, sampler, generator=torch.Generator().manual_seed(0))
    known = mask.expand_as(images) == 0
    assert torch.equal(out[known], images[known])
    assert not torch.equal(out[~known], images[~known])
    # nothing masked: the input; everything masked: an edit at strength 1 (DDIM draws no noise in its steps)
    assert torch.equal(inpaint(model, images, torch.zeros(1, 1, 8, 8), sampler), images)
    full = inpaint(model, images, torch.ones(1, 1, 8, 8), sampler, generator=torch.Generator().manual_seed(3))
    assert torch.equal(full, edit(model, images, 1.0, sampler, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(inpaint(model, images, mask, sampler, strength=0.05), images)  # 0.4 of 8 steps: none runs
    for bad_mask, message in [(torch.zeros(1, 8, 8), "mask must be"), (torch.full((1, 1, 8, 8), 2.0), "mask values")]:
        with pytest.raises(ValueError, match=message):
            inpaint(model, images, bad_mask, sampler)


def test_repaint_levels_follow_the_jump_schedule():
    from diffexp.samplers.base import resampling_levels

    assert resampling_levels(4, 2, 1) == [0, 1, 2, 3, 4]
    # jump points k = 4, 2 (k = steps - 1 - j * L while k >= L = 2): back up two levels, once each
    assert resampling_levels(5, 2, 2) == [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert resampling_levels(3, 1, 3) == [0, 1, 0, 1, 0, 1, 2, 1, 2, 1, 2, 3]
    levels = resampling_levels(20, 5, 4)
    downs = sum(b > a for a, b in zip(levels, levels[1:]))
    assert downs == 20 + len(range(19, 4, -5)) * 3 * 5  # every jump point redoes jump_length steps 3 more times
    assert levels[-1] == 20 and all(abs(b - a) in (1, 5) for a, b in zip(levels, levels[1:]))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jump_n_sample must be a positive integer"):
            resampling_levels(10, 2, bad)


def test_repaint_resampling_keeps_known_pixels_and_counts_its_evaluations():
    from diffexp.samplers import DPMSolver2M, HeunSampler

    model = model_with()
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1  # regenerate the right half
    calls = []
    model.net.register_forward_hook(lambda module, args, out: calls.append(1))
    for sampler in (DDIMSampler(model.schedule, steps=10, eta=1.0, progress=False),
                    DPMSolver2M(model.schedule, steps=10, progress=False),
                    HeunSampler(model.schedule, steps=6, progress=False)):
        calls.clear()
        plain = inpaint(model, images, mask, sampler, generator=torch.Generator().manual_seed(0))
        assert len(calls) == sampler.nfe()
        calls.clear()
        out = inpaint(model, images, mask, sampler, generator=torch.Generator().manual_seed(0), jump_length=2,
                            jump_n_sample=3)
        assert len(calls) == sampler.nfe(0, 2, 3) > sampler.nfe()
        known = mask.expand_as(images) == 0
        assert torch.equal(out[known], images[known]) and torch.isfinite(out).all()
        assert not torch.equal(out, plain)
        calls.clear()
        same = inpaint(model, images, mask, sampler, generator=torch.Generator().manual_seed(0), jump_n_sample=1,
                             jump_length=3)
        assert torch.equal(same, plain)  # jump_n_sample = 1: no resampling, whatever jump_length


def test_latent_inpainting_keeps_known_pixels_and_blends_a_downsampled_mask():
    from diffexp.autoencoders import OwnAutoencoder
    from diffexp.nets.autoencoder import AutoencoderKL
    from diffexp.spaces import LatentSpace

    torch.manual_seed(0)
    ae = OwnAutoencoder(net=AutoencoderKL(base_channels=16, channel_mult=[1, 2]))
    net = UNet(image_size=8, in_channels=4, base_channels=16, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), attention_levels=[-1], dropout=0.0)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    model = DiffusionModel(net, get_schedule("linear", num_timesteps=100), space=LatentSpace(ae, 16, scale_factor=1.0))
    sampler = DDIMSampler(model.schedule, steps=4, progress=False)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    seen = []
    model.net.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    out = inpaint(model, images, mask, sampler, generator=torch.Generator().manual_seed(0), jump_length=1,
                        jump_n_sample=2)
    known = mask.expand_as(images) == 0
    assert out.shape == images.shape and torch.equal(out[known], images[known])
    assert not torch.allclose(out[~known], images[~known])
    assert seen[0].shape == (2, 4, 8, 8)  # the sampler ran in the 8 x 8 latent grid
    with pytest.raises(ValueError, match="mask must be"):
        inpaint(model, images, torch.zeros(1, 1, 8, 8), sampler)  # the latent grid's size is not the images'


def test_slerp_keeps_endpoints_exactly_and_the_norm_of_orthogonal_noise():
    from diffexp.diffusion import slerp

    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    a[0, 0], b[1, 2] = 2.0, 2.0  # orthogonal, equal norms: the arc keeps norm 2
    mixed = slerp(a, b, torch.linspace(0, 1, 7))
    assert torch.equal(mixed[0], a) and torch.equal(mixed[-1], b)
    torch.testing.assert_close(mixed.flatten(1).norm(dim=1), torch.full((7,), 2.0))
    torch.testing.assert_close(mixed[3], (a + b) / 2**0.5)  # w = 1/2: sin(pi/4) / sin(pi/2) of each
    x = torch.randn(4, 4)
    torch.testing.assert_close(slerp(x, 3 * x, torch.tensor([0.5]))[0], 2 * x)  # parallel: a straight line


def test_interpolation_endpoints_are_the_two_plain_samples():
    model = model_with()
    sampler = DDIMSampler(model.schedule, steps=5, progress=False)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    frames = interpolate(model, 5, x_T, sampler)
    assert frames.shape == (5, 1, 8, 8)
    torch.testing.assert_close(frames[0], model.sample(1, sampler=sampler, x_T=x_T[:1])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[-1], model.sample(1, sampler=sampler, x_T=x_T[1:])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(frames[2], frames[0], atol=1e-3) and not torch.allclose(frames[2], frames[-1], atol=1e-3)
    for frames_, noise, message in [(1, x_T, "frames must be"), (3, x_T[:1], "two endpoint noises")]:
        with pytest.raises(ValueError, match=message):
            interpolate(model, frames_, noise, sampler)
    with pytest.raises(ValueError, match="text-conditioned"):
        interpolate(model, 3, x_T, sampler, captions=("a", "b"))


def test_prompt_interpolation_endpoints_are_the_two_prompts_samples():
    from diffexp.conditioning import TextConditioner
    from diffexp.text import LearnedTextEncoder

    torch.manual_seed(0)
    encoder = LearnedTextEncoder(dim=16, layers=1, heads=2, max_length=6)
    encoder.fit_vocabulary(["a red circle", "a big blue square at the top"])
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), dropout=0.0, context_dim=16)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    model = DiffusionModel(net, get_schedule("linear", num_timesteps=100), conditioner=TextConditioner(encoder))
    sampler = DDIMSampler(model.schedule, steps=4, progress=False)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ("a red circle", "a big blue square at the top")  # token masks of different lengths
    frames = interpolate(model, 4, x_T, sampler, captions=prompts, guidance_scale=2.0)
    for frame, noise, prompt in ((frames[0], x_T[:1], prompts[0]), (frames[-1], x_T[1:], prompts[1])):
        plain = model.sample(1, sampler=sampler, x_T=noise, captions=[prompt], guidance_scale=2.0)[0]
        torch.testing.assert_close(frame, plain, atol=1e-5, rtol=0)
    same_noise = interpolate(model, 3, x_T[[0, 0]], sampler, captions=prompts, guidance_scale=2.0)
    assert not torch.allclose(same_noise[0], same_noise[-1], atol=1e-3)  # only the prompt moved
