"""Image editing: SDEdit image-to-image (DiffusionModel.edit)."""
from __future__ import annotations

import pytest
import torch

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
    assert torch.equal(model.edit(images, 0.0, sampler), images)
    edited = model.edit(images, 1.0, sampler, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    sampled = model.sample(3, sampler=sampler, x_T=noise)
    assert torch.equal(edited, sampled)  # abar at the first trailing timestep is 0: nothing of the image is left


def test_strength_runs_the_last_steps_from_the_forward_noised_image():
    model = model_with()
    sampler = DDIMSampler(model.schedule, steps=10, progress=False)
    calls = []
    model.net.register_forward_hook(lambda module, args, out: calls.append(args[1][0].item()))
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    out = model.edit(images, 0.4, sampler, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.abs().max() <= 1
    assert calls == sampler.timesteps[6:].tolist()  # round(0.4 * 10) = 4 steps, the last four timesteps
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="strength must lie in"):
            model.edit(images, bad, sampler)


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
    run_script("sample.py", f"ckpt={tiny_checkpoint}", f"init_image={folder / 'b.png'}", f"mask={tmp_path / 'mask.png'}",
               "strength=1", "n=2", "sampler.steps=4", f"out={tmp_path / 'inpaint'}", cwd=tmp_path, check=True)
    filled = np.load(tmp_path / "inpaint" / "samples.npz")["images"][..., 0]
    original = np.asarray(Image.open(folder / "b.png"))
    assert (filled[:, mask == 0] == original[mask == 0]).all() and (filled[:, mask > 0] != original[mask > 0]).any()
    for override, message in [("n=3", "multiple of the 2 init images"), ("strength=1.5", "strength"),
                              (f"init_image={tmp_path / 'none'}", "does not exist")]:
        args = [f"ckpt={tiny_checkpoint}", f"init_image={folder}", "n=2", override, f"out={tmp_path / 'bad'}"]
        result = run_script("sample.py", *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-800:]


def test_inpainting_keeps_the_known_pixels_exactly():
    model = model_with()
    sampler = DDIMSampler(model.schedule, steps=8, progress=False)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1  # regenerate the centre
    out = model.inpaint(images, mask, sampler, generator=torch.Generator().manual_seed(0))
    known = mask.expand_as(images) == 0
    assert torch.equal(out[known], images[known])
    assert not torch.equal(out[~known], images[~known])
    # nothing masked: the input; everything masked: an edit at strength 1 (DDIM draws no noise in its steps)
    assert torch.equal(model.inpaint(images, torch.zeros(1, 1, 8, 8), sampler), images)
    full = model.inpaint(images, torch.ones(1, 1, 8, 8), sampler, generator=torch.Generator().manual_seed(3))
    assert torch.equal(full, model.edit(images, 1.0, sampler, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(model.inpaint(images, mask, sampler, strength=0.05), images)  # 0.4 of 8 steps: none runs
    for bad_mask, message in [(torch.zeros(1, 8, 8), "mask must be"), (torch.full((1, 1, 8, 8), 2.0), "mask values")]:
        with pytest.raises(ValueError, match=message):
            model.inpaint(images, bad_mask, sampler)
