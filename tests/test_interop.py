"""diffusers interoperability: the U-Net map both ways, export, import (net.init_from), refusals."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose_config, run_script

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel  # noqa: E402

from diffexp.config import build_model  # noqa: E402
from diffexp.interop import (InteropError, diffusers_unet_config, export_pipeline, from_diffusers_state,  # noqa: E402
                             to_diffusers_state, unet_options_from_diffusers)
from diffexp.nets import UNet  # noqa: E402

# google/ddpm-cifar10-32's unet config.json, as published (Ho et al. 2020's CIFAR-10 network)
DDPM_CIFAR10 = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (so zero-initialised output layers cannot hide a wrong map)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    return module.eval()


def max_diff(net, unet, channels, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, size, size, generator=g)
    t = torch.tensor([7, 903])
    with torch.no_grad():
        return float((net(x, t) - unet(x, t).sample).abs().max())


@pytest.fixture(scope="module")
def ddpm_cifar10_folder(tmp_path_factory):
    """A UNet2DModel with google/ddpm-cifar10-32's exact config and random weights, saved as a local folder."""
    torch.manual_seed(0)
    unet = randomise(UNet2DModel(**DDPM_CIFAR10))
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    unet.save_pretrained(folder)
    return folder, unet


@pytest.mark.parametrize("preset,size,channels", [("tiny", 16, 1), ("small", 32, 3)])
def test_presets_map_onto_unet2dmodel(preset, size, channels):
    from diffexp.course import net_preset

    net = randomise(net_preset(preset, size, channels))
    unet = UNet2DModel(**diffusers_unet_config(net)).eval()
    unet.load_state_dict(to_diffusers_state(net), strict=True)
    assert max_diff(net, unet, channels, size) < 1e-5
    back = from_diffusers_state(net, unet.state_dict())
    assert back.keys() == net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_conventions_change_the_function():
    """The three options are real: the default conventions give another function with the same weights."""
    from diffexp.nets.layers import timestep_embedding

    t = torch.tensor([0.0, 5.0])
    a = timestep_embedding(t, 8)
    b = timestep_embedding(t, 8, order="sin_cos", freq_shift=1)
    half = 4
    w = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1))
    assert torch.allclose(b, torch.cat([torch.sin(t[:, None] * w), torch.cos(t[:, None] * w)], 1), atol=1e-6)
    assert not torch.allclose(a, b)
    x = torch.randn(1, 3, 8, 8)
    kw = dict(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
    torch.manual_seed(0)
    net = randomise(UNet(**kw))
    padded = UNet(**kw, downsample_padding=0).eval()
    padded.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert (net(x, torch.tensor([3])) - padded(x, torch.tensor([3]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="downsample_padding"):
        UNet(**kw, downsample_padding=2)
    with pytest.raises(ValueError, match="time_embedding_order"):
        UNet(**kw, time_embedding_order="tan_cos")


def test_import_ddpm_cifar10_config(ddpm_cifar10_folder, tmp_path):
    """net.init_from=FOLDER with unet=base: same outputs as the UNet2DModel to 1e-5, conventions in the config,
    export -> import is the identity."""
    folder, unet = ddpm_cifar10_folder
    cfg = compose_config("train", ["data=cifar10", "net=base", f"net.init_from={folder}"], tmp_path / "run")
    model = build_model(cfg)
    assert (cfg.net.time_embedding_order, cfg.net.time_freq_shift, cfg.net.downsample_padding) == ("sin_cos", 1, 0)
    assert cfg.net.init_from == str(folder)  # kept in the run config as a record (a checkpoint does not re-import)
    assert sum(p.numel() for p in model.net.parameters()) == sum(p.numel() for p in unet.parameters()) == 35_746_307
    assert max_diff(model.net.eval(), unet, 3, 32) < 1e-5

    export_pipeline(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())
    assert {k: config[k] for k in DDPM_CIFAR10} == DDPM_CIFAR10 | {"freq_shift": 1.0}
    again = compose_config("train", ["data=cifar10", "net=base", f"net.init_from={tmp_path / 'exported'}"],
                           tmp_path / "run2")
    reimported = build_model(again).net.state_dict()
    assert all(torch.equal(reimported[k], v) for k, v in model.net.state_dict().items())


def test_import_refuses_other_layouts_and_conventions(ddpm_cifar10_folder, tmp_path):
    folder, _ = ddpm_cifar10_folder
    cfg = compose_config("train", ["data=cifar10", "net=small", f"net.init_from={folder}"], tmp_path / "run")
    with pytest.raises(InteropError, match=r"net.base_channels=128.*net.channel_mult=\[1, 2, 2, 2\]"):
        build_model(cfg)
    for key, value in [("act_fn", "mish"), ("time_embedding_type", "fourier"), ("norm_num_groups", 16),
                       ("downsample_padding", 2), ("mid_block_scale_factor", 2**-0.5)]:
        with pytest.raises(InteropError, match=f"{key}="):
            unet_options_from_diffusers({**DDPM_CIFAR10, key: value})
    with pytest.raises(InteropError, match="attention at levels"):
        unet_options_from_diffusers({**DDPM_CIFAR10, "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * 3})
    missing = compose_config("train", ["data=cifar10", "net=base", f"net.init_from={tmp_path}"], tmp_path / "r3")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        build_model(missing)


def test_export_refuses_models_without_a_pipeline(tmp_path):
    text = build_model(compose_config("train", ["experiment=shapes_text2img"], tmp_path / "t"))
    with pytest.raises(InteropError, match="text-conditioned.*cross-attention"):
        export_pipeline(text, tmp_path / "x")
    labels = build_model(compose_config("train", ["conditioning=class"], tmp_path / "c"))
    with pytest.raises(InteropError, match="class-conditional"):
        export_pipeline(labels, tmp_path / "x")
    odd = UNet(image_size=16, in_channels=1, base_channels=24, channel_mult=(1, 2), attention_resolutions=())
    with pytest.raises(InteropError, match="multiple of 32"):
        diffusers_unet_config(odd)
    for overrides, message in [(["formulation=edm"], "EDM's preconditioning scales the net's input"),
                               (["formulation=vp"], "no diffusers scheduler that reproduces it"),
                               (["formulation=flow", "model.prediction_type=epsilon", "path.t_max=0.99"],
                                "steps on a velocity"),
                               (["formulation=ddpm", "model.prediction_type=velocity"], "DDPMScheduler takes epsilon, sample or v")]:
        model = build_model(compose_config("train", overrides, tmp_path / "f"))
        with pytest.raises(InteropError, match=message):
            export_pipeline(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_flow_model_exports_with_flow_match_euler_and_samples_as_diffexp(tmp_path):
    """A flow-matching model exports as UNet2DModel + FlowMatchEulerDiscreteScheduler; DDPMPipeline's loop (the
    UNet at the scheduler's 1000 t, Euler on its velocity) from the same noise gives diffexp's Euler samples with
    uniform spacing (linspace(1, 1/1000): the scheduler's sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffexp.course import sampler

    model = build_model(compose_config("train", ["formulation=flow"], tmp_path / "f")).eval()
    randomise(model.net)
    out = tmp_path / "flow"
    assert export_pipeline(model, out) < 1e-5
    pipe = DDPMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=12,
                  output_type="np").images
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = model.sample(2, sampler(model, "euler", steps=12, timestep_spacing="uniform"), x_T=x_T)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(theirs - ours).max() < 1e-4


def test_export_cli_and_pipelines_match_diffexp(tiny_ddpm_checkpoint, tmp_path):
    """python -m diffexp.export writes a folder DDPMPipeline/DDIMPipeline load; DDIM from the same noise gives
    diffexp's DDIM samples; bad arguments and a non-empty out are refused."""
    from diffexp.course import load, sampler
    from diffexp.export import main

    out = tmp_path / "exported"
    main([f"ckpt={tiny_ddpm_checkpoint}", f"out={out}"])
    record = json.loads((out / "diffexp_export.json").read_text())
    assert record["max_abs_diff_vs_diffexp"] < 1e-5 and record["weights"] == "EMA"
    model, _ = load(tiny_ddpm_checkpoint)

    ddim = DDIMPipeline.from_pretrained(out)
    ddim.set_progress_bar_config(disable=True)
    theirs = ddim(batch_size=3, generator=torch.Generator().manual_seed(5), eta=0.0, num_inference_steps=20,
                  output_type="np").images
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    ours = model.sample(3, sampler(model, "ddim", steps=20), x_T=x_T)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(theirs - ours).max() < 1e-4

    ddpm = DDPMPipeline.from_pretrained(out)
    ddpm.set_progress_bar_config(disable=True)
    images = ddpm(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1) and (images >= 0).all() and (images <= 1).all()
    assert ddpm.scheduler.config.prediction_type == model.prediction_type
    assert torch.allclose(ddpm.scheduler.betas.double(), model.schedule.betas.double(), atol=1e-7)

    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="not empty"):
        main([f"ckpt={tiny_ddpm_checkpoint}", f"out={out}"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    for bad, message in [(["ckpt=x"], "out= is required"), ([f"ckpt={tiny_ddpm_checkpoint}", f"out={tmp_path}/o", "ema=maybe"],
                                                            "ema='maybe'"), (["outdir=x"], "unknown argument")]:
        with pytest.raises(SystemExit, match=message):
            main(bad)


@pytest.mark.slow
def test_train_from_imported_unet_and_export_cli(ddpm_cifar10_folder, tmp_path):
    """`python train.py ... net.init_from=DIR` trains from the imported weights; its checkpoint rebuilds the same
    conventions; `python -m diffexp.export` on it writes a pipeline folder."""
    import subprocess
    import sys

    from diffexp.course import load

    folder, unet = ddpm_cifar10_folder
    run_dir = tmp_path / "run"
    run_script("train.py", "data=image_folder", f"data.root={make_images(tmp_path / 'images')}", "data.image_size=32",
               "data.channels=3", "net=base", f"net.init_from={folder}", "trainer.max_steps=1", "eval_every=1",
               "data.batch_size=2", "callbacks=none", "logger=none", f"hydra.run.dir={run_dir}", cwd=tmp_path,
               check=True)
    model, cfg = load(run_dir / "checkpoints" / "model.safetensors", use_ema=False)
    assert (cfg.net.time_embedding_order, cfg.net.downsample_padding) == ("sin_cos", 0)
    assert 0 < max_diff(model.net, unet, 3, 32) < 1.0  # one optimizer step away from the imported weights
    result = subprocess.run([sys.executable, "-m", "diffexp.export", f"ckpt={run_dir / 'checkpoints' / 'model.safetensors'}",
                             f"out={tmp_path / 'exp'}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max |diffusers - diffexp|" in result.stdout
    assert UNet2DModel.from_pretrained(tmp_path / "exp", subfolder="unet").config.freq_shift == 1


def make_images(folder):
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
def test_readme_export_and_import_commands_as_typed(fresh_workdir):
    """The README's export and net.init_from commands, verbatim, after a (shrunk) quickstart in a fresh directory."""
    from tests.conftest import SHRINK, readme_command, run_as_typed

    run_script("train.py", *SHRINK, cwd=fresh_workdir, check=True)
    export = readme_command("python -m diffexp.export ckpt=logs/train/latest/checkpoints/last.ckpt out=exported/digits")
    result = run_as_typed(export, fresh_workdir, shrink=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (fresh_workdir / "exported" / "digits" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((fresh_workdir / "exported" / "digits" / "diffexp_export.json").read_text())["max_abs_diff_vs_diffexp"] < 1e-5
    import subprocess
    import sys

    from tests.conftest import user_env

    again = subprocess.run([sys.executable, *export.split()[1:]], cwd=fresh_workdir, env=user_env(fresh_workdir),
                           capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr
    result = run_as_typed(readme_command("python train.py net.init_from=exported/digits"), fresh_workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "UNet2DModel weights imported" in result.stderr


def test_export_merges_lora_refuses_latents_and_replaces_only_when_asked(tmp_path):
    from diffexp.course import pretrained

    model = build_model(compose_config("train", ["model.lora.rank=4"], tmp_path / "lora"))
    for name, p in model.net.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # adapters that change the function
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_pipeline(model, tmp_path / "out")
    assert export_pipeline(model, tmp_path / "out", overwrite=True) < 1e-5  # merged adapters, same function
    assert not (tmp_path / "out" / "stale.txt").exists() and not list(tmp_path.glob(".out.export-tmp"))
    latent, _ = pretrained("shapes_latent")
    with pytest.raises(InteropError, match="latent diffusion model"):
        export_pipeline(latent, tmp_path / "latent")
    assert not (tmp_path / "latent").exists()


def test_export_cli_refuses_what_it_cannot_export(tmp_path):
    from diffexp.export import main
    from diffexp.pretrained import path

    for args, message in [([f"ckpt={path('shapes_vae')}", f"out={tmp_path}/v"], "autoencoder"),
                          ([f"ckpt={path('digits')}", f"out={tmp_path}/d", "ema=false"], "last.ckpt for its raw"),
                          ([f"ckpt={path('shapes_text')}", f"out={tmp_path}/t"], "text-conditioned"),
                          ([f"ckpt={path('digits')}", "out=/proc/diffexp-export"], "cannot be written")]:
        with pytest.raises(SystemExit, match=message):
            main(args)
    assert not any(tmp_path.iterdir())


def test_export_never_deletes_the_folder_it_runs_in_and_refuses_adapter_files(tmp_path, monkeypatch):
    from diffexp.checkpoints import read_weights, save_weights
    from diffexp.export import main
    from diffexp.pretrained import path

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in ("..", ".", str(tmp_path)):
        with pytest.raises(SystemExit, match="current folder or one above"):
            main([f"ckpt={path('digits')}", f"out={out}", "overwrite=true"])
    assert (tmp_path / "a" / "keep.txt").read_text() == "mine" and work.is_dir()
    adapter = tmp_path / "adapter.safetensors"
    config = read_weights(path("digits"))["diffexp_config"]
    save_weights({"net.mid.1.qkv.lora_A.default.weight": torch.zeros(4, 64)}, config, adapter)
    with pytest.raises(SystemExit, match="LoRA adapter file"):
        main([f"ckpt={adapter}", f"out={tmp_path}/x"])


def test_import_refuses_conditional_targets(ddpm_cifar10_folder, tmp_path):
    folder, _ = ddpm_cifar10_folder
    cfg = compose_config("train", ["data=cifar10", "net=base", "conditioning=class", "conditioning.num_classes=10",
                                   f"net.init_from={folder}"], tmp_path / "run")
    with pytest.raises(InteropError, match="class-conditional"):
        build_model(cfg)
