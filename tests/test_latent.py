"""Latent diffusion: the autoencoder, the frozen-autoencoder interface, the latent module, end-to-end runs."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.conftest import SHRINK, VAE_SHRINK, compose_config
from diffexp.autoencoders import DiffusersAutoencoder, OwnAutoencoder
from diffexp.config import build_model
from diffexp.checkpoints import CONFIG_KEY
from diffexp.nets import AutoencoderKL, DiagonalGaussian

LATENT = ["experiment=shapes_latent", "data.num_train=64", "data.num_val=16", "model.space.scale_estimate_images=32"]


@pytest.mark.parametrize("mult,f", [([1], 1), ([1, 2], 2), ([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
def test_autoencoder_shapes_for_each_downsampling_factor(mult, f):
    ae = AutoencoderKL(in_channels=3, image_size=32, base_channels=16, channel_mult=mult, latent_channels=4)
    x = torch.randn(2, 3, 32, 32)
    posterior = ae.encode(x)
    assert ae.downsampling_factor == f and ae.latent_size == 32 // f
    assert posterior.mean.shape == posterior.std.shape == (2, 4, 32 // f, 32 // f)
    assert ae.decode(posterior.sample()).shape == x.shape


def test_autoencoder_rejects_sizes_not_divisible_by_f():
    with pytest.raises(ValueError, match="not divisible"):
        AutoencoderKL(image_size=30, base_channels=16, channel_mult=[1, 2, 2])


def test_kl_matches_torch_distributions_and_is_zero_only_at_the_prior():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], 1))
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    assert (posterior.kl() > 0).all()
    prior = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    assert torch.allclose(prior.kl(), torch.zeros(2))
    # scale: each latent element contributes 0.5 * mean^2 when var = 1
    shifted = DiagonalGaussian(torch.cat([torch.full((1, 4, 3, 3), 2.0), torch.zeros(1, 4, 3, 3)], 1))
    assert shifted.kl().item() == pytest.approx(0.5 * 4.0 * 36)


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    from diffexp.lit import VAETraining

    torch.manual_seed(0)
    net = AutoencoderKL(base_channels=16, channel_mult=[1, 2])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for weight in (0.0, 1e-6, 1.0):
        module = VAETraining(net, kl_weight=weight)
        torch.manual_seed(1)
        out = module.losses(x)
        assert out["loss"].item() == pytest.approx(out["rec"].item() + weight * out["kl"].item(), rel=1e-6)
        assert out["rec"].item() == pytest.approx((out["x_hat"] - x).abs().flatten(1).sum(1).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        VAETraining(net, reconstruction_loss="huber")


def test_vae_run_writes_checkpoint_reconstructions_and_psnr(vae_ckpt):
    run_dir = vae_ckpt.parent.parent
    assert sorted(p.name for p in (run_dir / "images").glob("reconstructions_*.png"))
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/psnr" in metrics.splitlines()[0]
    net = OwnAutoencoder(str(vae_ckpt)).net
    assert net.latent_channels == 4 and net.downsampling_factor == 4


def test_model_vae_with_the_default_callbacks(tmp_path):
    """The VAE draws its own images (log_images), so callbacks=default works; sampling callbacks say why not."""
    from diffexp.train import build, run

    run(compose_config("train", VAE_SHRINK + ["callbacks=default"], tmp_path / "run"))
    assert sorted((tmp_path / "run" / "images").glob("reconstructions_*.png"))
    cfg = compose_config("train", VAE_SHRINK + ["callbacks=[default,fid]", "callbacks.fid.metrics=[fid_shapes]"],
                         tmp_path / "fid")
    with pytest.raises(ValueError, match="callbacks=vae"):
        run(cfg)
    cfg = compose_config("train", ["model=vae", "callbacks=vae"], tmp_path / "run")  # quickstart's diffusion options
    with pytest.raises(TypeError, match="experiment=shapes_vae"):
        build(cfg)


def test_own_autoencoder_rejects_a_diffusion_checkpoint(tiny_checkpoint):
    with pytest.raises(ValueError, match="not a VAE"):
        OwnAutoencoder(str(tiny_checkpoint))
    with pytest.raises(FileNotFoundError, match="vae.ckpt"):
        OwnAutoencoder("/nonexistent/vae.ckpt")


def test_mismatched_latent_channels_or_size_fail_before_training(tmp_path, vae_ckpt):
    from diffexp.train import build

    for override, option in (("net.in_channels=3", "net.in_channels=3"), ("net.image_size=16", "net.image_size=16")):
        cfg = compose_config("train", SHRINK + LATENT + [f"vae.ckpt={vae_ckpt}", override], tmp_path / "run")
        with pytest.raises(ValueError, match=option):
            build(cfg)
    cfg = compose_config("train", SHRINK + ["model=latent"], tmp_path / "run")
    with pytest.raises(ValueError, match="vae=own"):
        build(cfg)


@pytest.mark.slow
def test_scale_factor_estimated_once_and_restored_from_checkpoint(tmp_path, vae_ckpt, monkeypatch):
    from diffexp.api import load_model
    from diffexp.spaces import LatentSpace
    from diffexp.train import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    calls = []
    estimate = LatentSpace.estimate_scale
    monkeypatch.setattr(LatentSpace, "estimate_scale", lambda self, ds: calls.append(1) or estimate(self, ds))
    overrides = SHRINK + LATENT + [f"vae.ckpt={vae_ckpt}", "paths.latest_link=null"]
    run(compose_config("train", overrides, tmp_path / "first"))
    assert len(calls) == 1
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    scale = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]["space.latent_scale"].item()

    # the estimate is 1/std of the raw training latents (cached ones, in dataset order)
    model, cfg = load_model(ckpt)
    from diffexp.config import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = torch.stack([datamodule.train_set[i]["image"] for i in range(32)])
    raw = model.space.autoencoder.encode(images, 1.0)
    assert scale == pytest.approx(1.0 / raw.flatten().std().item(), rel=1e-4)
    assert model.space.latent_scale.item() == scale

    # resuming keeps the stored value: no second estimate
    run(compose_config("train", overrides + [f"ckpt_path={ckpt}", "trainer.max_steps=6"], tmp_path / "resumed"))
    assert len(calls) == 1
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["state_dict"]["space.latent_scale"].item() == scale and resumed["global_step"] == 6


def test_latent_sampling_returns_images_at_data_size(tmp_path, vae_ckpt, monkeypatch):
    from diffexp.api import load_model
    from diffexp.train import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    run(compose_config("train", SHRINK + LATENT + [f"vae.ckpt={vae_ckpt}", "paths.latest_link=null"], tmp_path / "run"))
    assert sorted((tmp_path / "run" / "images").glob("samples_*.png"))
    assert sorted((tmp_path / "run" / "images").glob("denoising_forward_*.png"))
    assert list((tmp_path / "cache" / "latents").glob("*.pt"))  # cache_latents=true in the preset
    model, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.sample_shape == (4, 8, 8)
    images = model.sample(3, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    traj = model.sample(2, generator=torch.Generator().manual_seed(0), progress=False, return_trajectory=True)
    assert traj.xs[0].shape == (2, 3, 32, 32) and traj.sample.shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_sample_py_on_a_text_conditioned_latent_checkpoint(tmp_path, vae_ckpt, monkeypatch):
    from diffexp.sample import run as sample_run
    from diffexp.train import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    overrides = SHRINK + LATENT + ["experiment=shapes_latent_text2img", f"vae.ckpt={vae_ckpt}", "paths.latest_link=null"]
    run(compose_config("train", overrides, tmp_path / "run"))
    out = tmp_path / "samples"
    cfg = compose_config("sample", [f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "n=4", "batch_size=4",
                                    "sampler.steps=2", f"out={out}", "prompt=a red circle", "guidance_scale=2"],
                         tmp_path / "sample_run")
    sample_run(cfg)
    import numpy as np

    samples = np.load(out / "samples.npz")
    assert samples["images"].shape[1:] == (32, 32, 3) and len(samples["images"]) == 4

    # editing, interpolation and LoRA fine-tuning on the latent text model, as on pixel models
    from PIL import Image

    from diffexp.viz.__main__ import main as viz

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    Image.fromarray(samples["images"][0]).save(tmp_path / "input.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for name, extra in {"edit": ["strength=0.5"], "inpaint": [f"mask={tmp_path / 'mask.png'}", "strength=1",
                                                             "jump_length=1", "jump_n_sample=2"]}.items():
        cfg = compose_config("sample", [f"ckpt={ckpt}", "n=2", "sampler.steps=2", f"out={tmp_path / name}",
                                        f"init_image={tmp_path / 'input.png'}", "prompt=a red circle", *extra],
                             tmp_path / f"s_{name}")
        summary = sample_run(cfg)
        assert np.load(tmp_path / name / "samples.npz")["images"].shape == (2, 32, 32, 3)
    assert summary["nfe"] == 3  # 2 steps, the first redone once (RePaint jump at level 1)
    filled = np.load(tmp_path / "inpaint" / "samples.npz")["images"]
    original = np.asarray(Image.open(tmp_path / "input.png"))
    assert (filled[:, 16:] == original[16:]).all()  # kept pixels: the input's, blended in pixel space
    viz(["interpolate", "--ckpt", str(ckpt), "--frames", "3", "--steps", "2", "--prompt", "a red circle",
         "--prompt", "a blue square", "--out", str(tmp_path / "interp.png")])
    assert (tmp_path / "interp.png").is_file()
    overrides = SHRINK + LATENT + ["experiment=shapes_latent_text2img", f"vae.ckpt={vae_ckpt}", "paths.latest_link=null",
                                   f"init_from={ckpt}", "model.lora.rank=2", "trainer.max_steps=2"]
    run(compose_config("train", overrides, tmp_path / "lora_run"))
    adapter = tmp_path / "lora_run" / "checkpoints" / "adapter.safetensors"
    images = {}
    for name, extra in {"adapter": [f"ckpt={ckpt}", f"lora={adapter}"],
                        "run": [f"ckpt={tmp_path / 'lora_run' / 'checkpoints' / 'model.safetensors'}"]}.items():
        sample_run(compose_config("sample", extra + ["n=2", "sampler.steps=2", "prompt=a red circle",
                                                     f"out={tmp_path / name}"], tmp_path / f"s_{name}"))
        images[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(images["adapter"], images["run"])


# --- pretrained (diffusers) autoencoders, built from tiny random configs ---------------------------------
TINY_KL = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
TINY_TAESD = dict(encoder_block_out_channels=[8, 8, 8], decoder_block_out_channels=[8, 8, 8],
                  num_encoder_blocks=[1, 1, 1], num_decoder_blocks=[1, 1, 1], latent_channels=4)


@pytest.mark.parametrize("kind,config,f,scale", [("kl", TINY_KL, 2, 0.18215), ("tiny", TINY_TAESD, 4, 1.0)])
def test_diffusers_autoencoders_share_one_scale_convention(kind, config, f, scale):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ae = DiffusersAutoencoder(kind=kind, config=config)
    assert ae.latent_channels == 4 and ae.downsampling_factor == f and ae.scaling_factor == pytest.approx(scale)
    assert ae.state_dict() == {} and not any(p.requires_grad for p in ae.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    raw = ae.encode_raw(x)
    assert raw.shape == (2, 4, 32 // f, 32 // f)
    z = ae.encode(x, ae.scaling_factor, 0.1)
    torch.testing.assert_close(z, (raw - 0.1) * ae.scaling_factor)
    torch.testing.assert_close(ae.decode(z, ae.scaling_factor, 0.1), ae.decode_raw(raw).clamp(-1, 1))


def test_pretrained_vae_uses_its_published_scale_and_needs_no_estimate(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from omegaconf import OmegaConf

    cfg = compose_config("train", SHRINK + ["data=shapes", "model=latent", "vae=taesd", "net.in_channels=null",
                                            "net.image_size=null", "net.channel_mult=[1]", "model.space.scale_factor=null"],
                         tmp_path / "run")
    cfg.vae = OmegaConf.create({"_target_": "diffexp.autoencoders.DiffusersAutoencoder", "kind": "tiny",
                                "config": TINY_TAESD})
    model = build_model(cfg)
    assert cfg.net.in_channels == 4 and cfg.net.image_size == 8
    assert model.space.latent_scale.item() == 1.0 and model.sample_shape == (4, 8, 8)
    images = model.sample(2, generator=torch.Generator().manual_seed(0), progress=False,
                          sampler=model.make_sampler().__class__(model.path, steps=2,
                                                                        prediction_type=model.prediction.sampler_type))
    assert images.shape == (2, 3, 32, 32)


def test_missing_pretrained_vae_gives_a_clear_offline_error(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="vae.name_or_path"):
        DiffusersAutoencoder(kind="kl", name_or_path=str(tmp_path / "no-such-vae"), local_files_only=True)
    with pytest.raises(ValueError, match="vae.kind"):
        DiffusersAutoencoder(kind="vq", config={})


def test_latent_cache_is_reused(tmp_path):
    from diffexp.data.latents import encode_dataset
    from diffexp.data.shapes import make_shapes
    from diffexp.data.base import TensorImageDataset

    x, caps, _ = make_shapes(16, seed=0, image_size=32)
    dataset = TensorImageDataset(x, captions=caps)
    ae = OwnAutoencoder(net=AutoencoderKL(base_channels=16, channel_mult=[1, 2]))
    latents = encode_dataset(dataset, ae, cache_dir=tmp_path)
    assert latents.shape == (16, 4, 16, 16) and len(list((tmp_path / "latents").glob("*.pt"))) == 1
    ae.encode_raw = lambda images: (_ for _ in ()).throw(AssertionError("re-encoded"))
    torch.testing.assert_close(encode_dataset(dataset, ae, cache_dir=tmp_path), latents)


def test_latent_checkpoint_is_self_contained(tmp_path, vae_ckpt, monkeypatch):
    """The latent checkpoint carries its VAE's weights and architecture: sample.py works after the VAE file is gone."""
    import shutil

    from diffexp.api import load_model
    from diffexp.sample import run as sample_run
    from diffexp.train import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    vae_copy = tmp_path / "vae_run" / "last.ckpt"
    vae_copy.parent.mkdir()
    shutil.copy(vae_ckpt, vae_copy)
    run(compose_config("train", SHRINK + LATENT + [f"vae.ckpt={vae_copy}", "paths.latest_link=null",
                                                   "cache_latents=false"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert checkpoint[CONFIG_KEY]["vae"]["ckpt"] == str(vae_copy)  # where it came from, for the record
    assert checkpoint[CONFIG_KEY]["vae"]["architecture"]["latent_channels"] == 4
    assert checkpoint[CONFIG_KEY]["net"]["in_channels"] == 4  # null in the preset, filled from the VAE
    vae_weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("space.autoencoder.net.")}
    original = torch.load(vae_copy, map_location="cpu", weights_only=False)["state_dict"]
    assert vae_weights and all(torch.equal(v, original[k[len("space.autoencoder."):]]) for k, v in vae_weights.items())
    before, _ = load_model(ckpt)
    shutil.rmtree(vae_copy.parent)  # the VAE run directory is deleted
    after, _ = load_model(ckpt)
    from_weights, _ = load_model(ckpt.parent / "model.safetensors")  # the weights-only artefact carries it too
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = before.sample(2, x_T=noise, progress=False)
    torch.testing.assert_close(after.sample(2, x_T=noise, progress=False), expected)
    torch.testing.assert_close(from_weights.sample(2, x_T=noise, progress=False), expected)
    out = tmp_path / "samples"
    sample_run(compose_config("sample", [f"ckpt={ckpt}", "n=2", "sampler.steps=2", f"out={out}"], tmp_path / "s"))
    assert (out / "grid.png").is_file()


def test_latent_models_never_clip_latents_to_the_pixel_range():
    from diffexp.lit import DiffusionModel
    from diffexp.nets import UNet
    from diffexp.samplers import DDIMSampler
    from diffexp.schedules import get_schedule
    from diffexp.spaces import LatentSpace

    ae = OwnAutoencoder(net=AutoencoderKL(base_channels=16, channel_mult=[1, 2]))
    model = DiffusionModel(UNet(16, 4, base_channels=32, channel_mult=[1], attention_resolutions=[]),
                           get_schedule("linear"), space=LatentSpace(ae, 32, scale_factor=1.0))
    given = DDIMSampler(model.schedule, steps=2, clip_sample=True)
    with pytest.warns(UserWarning, match="clip_sample"):
        sampler = model.make_sampler(given)
    assert sampler.clip_sample is False and given.clip_sample is True  # a copy: the sampler given is unchanged
