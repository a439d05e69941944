"""Every formulation (formulation=ddpm|edm|flow|vp) composes with the rest of diffexp: conditioning and guidance,
editing, LoRA, latent models, training with EMA, resume, DDP and safe checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffexp.config import build_model, data_of_run
from diffexp.editing import edit, inpaint, interpolate
from tests.conftest import SHRINK, compose_config, run_script

FORMULATIONS = ["ddpm", "edm", "flow", "vp"]
EXPECTED = {  # path, prediction, density, weighting, default sampler
    "ddpm": ("DiscretePath", "epsilon", "UniformTimesteps", "MinSNR", "DDIMSampler"),
    "edm": ("EDMPath", "edm", "LogNormal", "EDMWeighting", "EDMSampler"),
    "flow": ("FlowPath", "velocity", "Uniform", None, "EulerSampler"),
    "vp": ("CosinePath", "v_prediction", "Uniform", None, "DPMSolver2M"),
}


def model_of(tmp_path, formulation, *overrides, randomise=True):
    cfg = compose_config("train", SHRINK + [f"formulation={formulation}", *overrides], tmp_path / formulation)
    model = build_model(cfg, data_of_run(cfg, from_checkpoint=False)).eval()
    if randomise:  # the zero-initialised output layer would make every prediction 0
        torch.manual_seed(0)
        torch.nn.init.normal_(model.net.conv_out.weight, std=0.05)
    return model, cfg


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_each_formulation_is_a_preset_of_its_parts(formulation, tmp_path):
    model, cfg = model_of(tmp_path, formulation, randomise=False)
    path, prediction, density, weighting, sampler = EXPECTED[formulation]
    assert type(model.path).__name__ == path and model.prediction_type == prediction
    assert type(model.objective.density).__name__ == density
    assert (type(model.objective.weighting).__name__ if model.objective.weighting else None) == weighting
    assert type(model.make_sampler()).__name__ == sampler
    assert model.make_sampler().timestep_spacing == {"ddpm": "leading", "edm": "karras"}.get(formulation, "trailing")


def test_every_piece_is_overridable_on_the_command_line(tmp_path):
    model, _ = model_of(tmp_path, "flow", "density=uniform", "weighting=min_snr", "weighting.gamma=2",
                        "path.t_min=0.01", "sampler=dpmpp_2m", "sampler.timestep_spacing=shifted", "sampler.shift=2",
                        randomise=False)
    assert type(model.objective.density).__name__ == "Uniform" and model.objective.weighting.gamma == 2.0
    assert model.path.t_min == 0.01
    sampler = model.make_sampler()
    assert type(sampler).__name__ == "DPMSolver2M" and sampler.timestep_spacing == "shifted" and sampler.shift == 2
    model, _ = model_of(tmp_path, "ddpm", "schedule=cosine", "model.prediction_type=v_prediction",
                        "model.min_snr_gamma=5", randomise=False)
    assert model.path.schedule.name == "cosine" and model.prediction_type == "v_prediction"
    assert model.objective.weighting.gamma == 5.0
    with pytest.raises(ValueError, match="both set the loss weighting"):
        model_of(tmp_path, "edm", "model.min_snr_gamma=5")
    with pytest.raises(ValueError, match="density=uniform_timesteps draws a discrete path"):
        model_of(tmp_path, "flow", "density=uniform_timesteps")


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_conditioning_and_guidance_on_every_formulation(formulation, conditioning, tmp_path):
    extra = ["text_encoder=class"] if conditioning == "class" else [
        "experiment=shapes_text2img", "data.num_train=32", "data.num_val=8", "text_encoder.dim=16",
        "text_encoder.heads=2", "net.num_heads=2", "net.base_channels=8", "net.channel_mult=[1,2]"]
    model, cfg = model_of(tmp_path, formulation, *extra)
    if conditioning == "text":
        model.conditioner.fit(data_of_run(cfg, from_checkpoint=False))
    x_T, cond = model.monitoring_inputs(3, seed=0)
    guided = model.sample(3, x_T=x_T, guidance_scale=3.0, progress=False, **cond)
    plain = model.sample(3, x_T=x_T, guidance_scale=1.0, progress=False, **cond)
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.equal(guided, plain)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_editing_on_every_formulation(formulation, tmp_path):
    """SDEdit (strength 0 is the input; strength 1 is sampling where the path starts at pure noise), inpainting
    keeps the known pixels (with RePaint's resampling too), interpolation's endpoints are the plain samples."""
    from diffexp.course import sampler as make

    model, _ = model_of(tmp_path, formulation)
    sampler = make(model, "ddim", steps=6)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(edit(model, images, 0.0, sampler), images)
    edited = edit(model, images, 0.5, sampler, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(edited).all() and not torch.equal(edited, images)
    if model.path.alpha_sigma(float(sampler.timesteps[0]))[0] == 0:  # flow, vp: nothing of the image is left at t_0
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
        assert torch.equal(edit(model, images, 1.0, sampler, generator=torch.Generator().manual_seed(7)),
                           model.sample(2, sampler=sampler, x_T=noise))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    known = mask.expand_as(images) == 0
    for options in ({}, {"jump_length": 2, "jump_n_sample": 2}):
        out = inpaint(model, images, mask, sampler, generator=torch.Generator().manual_seed(0), **options)
        assert torch.equal(out[known], images[known]) and not torch.equal(out[~known], images[~known])
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    frames = interpolate(model, 4, x_T, sampler)
    # the same computation in a batch of 4 and of 1: equal up to the convolutions' summation order
    torch.testing.assert_close(frames[0], model.sample(1, sampler=sampler, x_T=x_T[:1])[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_lora_on_a_continuous_formulation(formulation, tmp_path):
    from diffexp.lora import is_adapter_key

    model, _ = model_of(tmp_path, formulation, "model.lora.rank=4")
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(k) for k in trainable)
    batch = {"image": torch.rand(4, 1, 16, 16) * 2 - 1}
    model.loss(batch, generator=torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for k, p in model.named_parameters() if not is_adapter_key(k))
    assert torch.isfinite(model.sample(2, progress=False)).all()


@pytest.mark.slow
@pytest.mark.parametrize("formulation", ["edm", "vp"])  # flow: the quickstart's, resumed in test_safety
def test_every_formulation_trains_resumes_and_samples_through_the_scripts(formulation, tmp_path):
    """train.py formulation=X as a user types it: EMA in the checkpoint and model.safetensors; resumed from its
    step-2 checkpoint it ends with the uninterrupted run's weights (and EMA) bit for bit; sample.py samples it and
    names its path and spacing in metrics.json."""
    from diffexp.checkpoints import load_file

    common = [f"formulation={formulation}", *SHRINK, "paths.latest_link=null",
              "callbacks.model_checkpoint.every_n_train_steps=2"]
    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path, check=True)
    step2 = next((tmp_path / "full" / "checkpoints").glob("step*2.ckpt"))
    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={step2}", cwd=tmp_path,
               check=True)
    full, resumed = (load_file(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("full", "resumed"))
    assert full["global_step"] == resumed["global_step"] == 4
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    ema = next(v for k, v in full["callbacks"].items() if k.startswith("EMA"))["ema_state"]
    ema_resumed = next(v for k, v in resumed["callbacks"].items() if k.startswith("EMA"))["ema_state"]
    assert all(torch.equal(v, ema_resumed[k]) for k, v in ema.items())
    out = tmp_path / "samples"
    run_script("sample.py", f"ckpt={tmp_path / 'full' / 'checkpoints' / 'model.safetensors'}", "n=4",
               "sampler.steps=4", f"out={out}", cwd=tmp_path, check=True)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["nfe"] == 4 and type(summary["path"]) is str
    assert summary["timestep_spacing"] == ("karras" if formulation == "edm" else "trailing")
    assert np.load(out / "samples.npz")["images"].shape == (4, 16, 16, 1)


@pytest.mark.slow
@pytest.mark.parametrize("formulation", ["edm", "flow"])
def test_latent_text_models_on_continuous_formulations(formulation, vae_ckpt, tmp_path, monkeypatch):
    from diffexp.sample import run as sample_run
    from diffexp.train import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    overrides = ["experiment=shapes_latent_text2img", f"vae.ckpt={vae_ckpt}", f"formulation={formulation}", *SHRINK,
                 "trainer.max_steps=2", "++data.num_train=32", "++data.num_val=8", "callbacks.sample_grid.n=2"]
    run(compose_config("train", overrides, tmp_path / "run"))
    summary = sample_run(compose_config("sample", [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "n=2",
                                                   "sampler.steps=3", "prompt=a red circle", "guidance_scale=2",
                                                   "progress=false", f"out={tmp_path / 's'}"], tmp_path / "x"))
    assert summary["n"] == 2 and np.load(tmp_path / "s" / "samples.npz")["images"].shape == (2, 32, 32, 3)
