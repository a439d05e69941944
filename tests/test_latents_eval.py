"""Latents encoded once into shards (python -m diffexp.encode_latents, train.py latents=DIR) and the evaluation
protocol (python -m diffexp.evaluate: reference statistics, chunked resumable samples, FID from statistics,
FD-DINOv2, precision/recall, seeds)."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from tests.conftest import SHRINK, compose_config
from tests.test_latent import LATENT

SHAPES_SMALL = ["data=shapes", "data.num_train=40", "data.num_val=8"]


def encode(tmp_path, out, *extra):
    from diffexp.encode_latents import run

    return run(compose_config("encode_latents", [f"out={out}", "progress=false", "shard_size=16", *extra],
                              tmp_path / "enc_run"))


# --- encoded latents --------------------------------------------------------------------------------------------
def test_encoded_latents_keep_the_posterior_and_resume_from_the_first_missing_shard(tmp_path, vae_ckpt):
    from diffexp.autoencoders import OwnAutoencoder
    from diffexp.config import instantiate
    from diffexp.data.latent_shards import LatentShardsDataModule
    from safetensors.torch import load_file

    out = tmp_path / "latents"
    vae = [*SHAPES_SMALL, "vae=own", f"vae.ckpt={vae_ckpt}"]
    assert encode(tmp_path, out, *vae) == {"train": 40, "val": 8}
    manifest = json.loads((out / "latents.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {"train": 40, "val": 8} and manifest["data_name"] == "shapes"
    assert sorted(p.name for p in out.glob("train-*.safetensors")) == [f"train-00000{i}.safetensors" for i in range(3)]

    # mean and logvar are the encoder's posterior of the images in order
    data = instantiate(compose_config("train", SHRINK + SHAPES_SMALL, tmp_path / "d").data)
    images = torch.stack([item["image"] for item in data.iter_items("train")])
    posterior = OwnAutoencoder(ckpt=str(vae_ckpt)).net.encode(images)
    dm = LatentShardsDataModule(str(out), batch_size=4)
    dm.setup()
    train = dm.dataset("train")
    torch.testing.assert_close(train.mean, posterior.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(train.logvar, posterior.logvar, rtol=1e-5, atol=1e-6)
    assert train.captions == data.captions("train") and dm.image_size == 32 and dm.name == "shapes"
    assert set(dm.dataset("val")[0]) == {"latent", "latent_logvar", "caption", "label"}

    # a stop after the first shard: the same command finishes what is missing, identically
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".safetensors", ".json")}
    for name in ("train-000001", "train-000002", "val-000000"):
        (out / f"{name}.safetensors").unlink()
    manifest["complete"] = False
    (out / "latents.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="only partly encoded"):
        LatentShardsDataModule(str(out))
    encode(tmp_path, out, *vae)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".safetensors", ".json")}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in after if k.endswith(".safetensors"))
    assert load_file(out / "train-000002.safetensors")["mean"].shape[0] == 8  # the short last shard

    # other data into the same directory is refused, and nothing is lost
    with pytest.raises(ValueError, match=r"was encoded with other \['data'\]"):
        encode(tmp_path, out, "data=shapes", "data.num_train=48", "data.num_val=8", "vae=own", f"vae.ckpt={vae_ckpt}")
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == \
        {k: v for k, v in after.items() if k.endswith(".safetensors")}


def test_training_draws_latents_from_the_stored_gaussian():
    from diffexp.autoencoders import OwnAutoencoder
    from diffexp.nets.autoencoder import AutoencoderKL
    from diffexp.spaces import LatentSpace

    net = AutoencoderKL(in_channels=3, image_size=8, base_channels=8, channel_mult=[1, 2], latent_channels=2)
    space = LatentSpace(OwnAutoencoder(net=net), image_size=8, scale_factor=0.5)
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    z = space.from_batch({"latent": mean, "latent_logvar": logvar}, torch.Generator().manual_seed(1))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * eps) * 0.5)
    torch.testing.assert_close(space.from_batch({"latent": mean}), mean * 0.5)  # a mean only: as cached latents


def test_a_run_builds_on_encoded_latents_with_one_option(tmp_path, vae_ckpt):
    """latents=DIR replaces the data (its sizes, classes, captions) and wins over the preset's cache_latents; a
    mismatch or a directory without latents is an error naming the option (the README test trains on them)."""
    from diffexp.train import build

    out = tmp_path / "latents"
    encode(tmp_path, out, "data=shapes", "data.num_train=24", "data.num_val=8", "vae=own", f"vae.ckpt={vae_ckpt}")
    overrides = SHRINK + LATENT + [f"vae.ckpt={vae_ckpt}", "paths.latest_link=null"]
    datamodule, model = build(compose_config("train", overrides + [f"latents={out}"], tmp_path / "b"))[:2]
    assert type(datamodule).__name__ == "LatentShardsDataModule" and model.space.latent_size == 8
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["latent"].shape == (8, 4, 8, 8) and set(batch) == {"latent", "latent_logvar", "label", "caption"}
    with pytest.raises(ValueError, match="data.image_size=16"):
        build(compose_config("train", overrides + [f"latents={out}", "data.image_size=16"], tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="holds no latents.json"):
        build(compose_config("train", overrides + [f"latents={tmp_path}"], tmp_path / "e"))


@pytest.mark.parametrize("size", [64, 128])
def test_sd_vae_shaped_latents_of_generated_shards(tmp_path, size):
    """An autoencoder laid out as sd-vae-ft-mse (f=8, 4 latent channels; tiny random widths) encodes WebDataset
    shards of larger generated images at ``size`` through `vae=sd_vae_ft_mse vae.name_or_path=FOLDER`."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    from diffexp.data.latent_shards import LatentShardsDataModule
    from diffexp.data.transforms import preprocess
    from diffexp.make_shards import write_shards

    folder = tmp_path / "vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=[4, 4, 4, 4], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=2,
                            layers_per_block=1).save_pretrained(folder)
    rng = np.random.default_rng(0)
    items = [{"image": preprocess(Image.fromarray(rng.integers(0, 256, (size + 40, size * 2, 3), dtype=np.uint8)),
                                  size, 3), "caption": f"picture {i}"} for i in range(6)]
    write_shards(items, tmp_path / "shards", shard_size=4)
    out = tmp_path / "latents"
    counts = encode(tmp_path, out, "data=webdataset", f"data.shards={tmp_path / 'shards'}", "data.captions=true",
                    f"data.image_size={size}", "data.num_workers=0", "vae=sd_vae_ft_mse",
                    f"vae.name_or_path={folder}", "splits=[train]")
    assert counts == {"train": 6}
    dm = LatentShardsDataModule(str(out))
    dm.setup()
    item = dm.dataset("train")[5]
    assert item["latent"].shape == item["latent_logvar"].shape == (4, size // 8, size // 8)
    assert item["caption"] == "picture 5" and dm.manifest["scaling_factor"] == pytest.approx(0.18215)


# --- the evaluation protocol ------------------------------------------------------------------------------------
def evaluate_cmd(tmp_path, *extra):
    from diffexp.evaluate import run

    return run(compose_config("evaluate", ["progress=false", *extra], tmp_path / "ev_run"))


@pytest.fixture(scope="module")
def digits_model():
    from tests.conftest import ROOT

    return ROOT / "src" / "diffexp" / "pretrained" / "digits" / "model.safetensors"


@pytest.mark.slow
def test_reference_statistics_then_fid_from_them_match_the_in_memory_metrics(tmp_path, digits_model):
    from diffexp.data import DigitsDataModule
    from diffexp.metrics.evaluate import evaluate
    from diffexp.metrics.protocol import read_reference

    ref = tmp_path / "ref.npz"
    metrics = "metrics=[fid_digits,precision_recall_digits,kid_digits]"
    assert evaluate_cmd(tmp_path, "data=digits", metrics, f"reference={ref}") is None
    statistics, meta = read_reference(ref)
    assert meta["n"] == len(DigitsDataModule().dataset("train")) and set(statistics) == {"digits"}
    with pytest.raises(FileExistsError, match="never overwritten"):
        evaluate_cmd(tmp_path, "data=digits", metrics, f"reference={ref}")

    out = tmp_path / "samples"
    common = [f"ckpt={digits_model}", metrics, f"reference={ref}", "n=60", "chunk_size=25", "seeds=[0,1]",
              "sampler=ddim", "sampler.steps=4", f"out={out}"]
    report = evaluate_cmd(tmp_path, *common)
    assert sorted(p.name for p in (out / "seed_1").iterdir()) == ["chunk_00000.pt", "chunk_00001.pt", "chunk_00002.pt"]
    assert set(report["mean"]) >= {"fid_digits", "precision_digits", "recall_digits", "kid_digits"}
    per_seed = [row["fid_digits"] for row in report["per_seed"]]
    assert report["mean"]["fid_digits"] == pytest.approx(np.mean(per_seed))
    assert report["std"]["fid_digits"] == pytest.approx(np.std(per_seed, ddof=1))

    # the same figure as torchmetrics' FID on the same (uint8) samples against the same real images
    images = torch.cat([torch.load(out / "seed_0" / f"chunk_0000{i}.pt")["images"] for i in range(3)])
    direct = evaluate(["fid_digits"], images.float() / 127.5 - 1, DigitsDataModule(), cache_dir=tmp_path / "cache")
    assert report["per_seed"][0]["fid_digits"] == pytest.approx(direct["fid_digits"]["value"], rel=1e-5)

    # resumed: a lost chunk is drawn again, identically; the figures do not move
    lost = (out / "seed_0" / "chunk_00001.pt").read_bytes()
    (out / "seed_0" / "chunk_00001.pt").unlink()
    again = evaluate_cmd(tmp_path, *common)
    assert torch.equal(torch.load(out / "seed_0" / "chunk_00001.pt")["images"],
                       torch.load(__import__("io").BytesIO(lost))["images"])
    assert again["per_seed"] == report["per_seed"]
    assert json.loads((out / "metrics.json").read_text())["mean"] == again["mean"]
    # other sampling settings into the same out= are refused, the samples kept
    with pytest.raises(ValueError, match=r"holds samples drawn with other \['sampler'\]"):
        evaluate_cmd(tmp_path, *[c for c in common if c != "sampler.steps=4"], "sampler.steps=3")
    assert len(list((out / "seed_0").glob("chunk_*.pt"))) == 3


def test_a_published_mu_sigma_file_gives_the_same_fid(tmp_path, digits_model):
    from diffexp.metrics.protocol import frechet_from_statistics, read_reference, write_reference
    from diffexp.metrics.scores import frechet_distance

    ref = tmp_path / "ref.npz"
    evaluate_cmd(tmp_path, "data=digits", "metrics=[fid_digits]", f"reference={ref}")
    statistics, meta = read_reference(ref)
    np.savez(tmp_path / "published.npz", mu=statistics["digits"]["mu"], sigma=statistics["digits"]["sigma"])
    published, published_meta = read_reference(tmp_path / "published.npz")
    assert published_meta == {"published": True} and set(published) == {"inception"}

    # the distance from statistics (torch-fidelity) equals the one from features (torchmetrics)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(200, 6, generator=g, dtype=torch.float64) + 0.3
    from diffexp.metrics.protocol import feature_statistics

    assert frechet_from_statistics(*feature_statistics(a), *feature_statistics(b)) == \
        pytest.approx(frechet_distance(a, b), rel=1e-6)
    # published files may store float32; a network of another width is an error, not a crash
    np.savez(tmp_path / "f32.npz", mu=statistics["digits"]["mu"].astype(np.float32),
             sigma=statistics["digits"]["sigma"].astype(np.float32))
    f32 = read_reference(tmp_path / "f32.npz")[0]["inception"]
    assert frechet_from_statistics(f32["mu"], f32["sigma"], statistics["digits"]["mu"],
                                   statistics["digits"]["sigma"]) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="statistics of other sizes"):
        frechet_from_statistics(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FileExistsError):
        write_reference(ref, {}, {})
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="neither diffexp's arrays nor 'mu' and 'sigma'"):
        read_reference(tmp_path / "other.npz")


def test_fd_dinov2_from_a_local_folder_and_a_clear_error_without_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    from diffexp.metrics.features import DINOv2Features

    folder = tmp_path / "dinov2"
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, patch_size=14, image_size=224)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder)
    ref = tmp_path / "ref.npz"
    evaluate_cmd(tmp_path, "data=digits", "metrics=[fd_dinov2]", f"reference={ref}", "reference_n=40",
                 f"dinov2={folder}")
    from diffexp.metrics.protocol import read_reference

    statistics, meta = read_reference(ref)
    assert statistics["dinov2"]["mu"].shape == (16,) and meta["n"] == 40
    features = DINOv2Features(folder)(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert features.shape == (2, 16)
    with pytest.raises(FileNotFoundError, match="DINOv2 weights for fd_dinov2 not found at .*huggingface-cli download "
                                                "facebook/dinov2-large"):
        DINOv2Features(tmp_path / "missing")
    other = tmp_path / "other"
    torch.manual_seed(1)
    transformers.Dinov2Model(config).save_pretrained(other)
    with pytest.raises(ValueError, match="computed with other dinov2 weights"):
        evaluate_cmd(tmp_path, "ckpt=x", "metrics=[fd_dinov2]", f"reference={ref}", f"dinov2={other}")


def test_precision_and_recall_by_prdc_on_known_sets():
    from diffexp.metrics.scores import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=g)
    same = precision_recall(real, real.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(real, torch.randn(400, 4, generator=g) + 50)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    narrow = precision_recall(real, 0.05 * torch.randn(400, 4, generator=g))  # mode collapse: precise, no recall
    assert narrow["precision"] > 0.9 and narrow["recall"] < 0.2
    assert precision_recall(real, real, max_n=100)["n_pr"] == 100


def test_evaluate_refuses_bad_input(tmp_path, digits_model):
    with pytest.raises(ValueError, match="lpips_diversity.* not part of the evaluation protocol"):
        evaluate_cmd(tmp_path, "metrics=[lpips_diversity]", "reference=x.npz")
    with pytest.raises(ValueError, match="seeds="):
        evaluate_cmd(tmp_path, "metrics=[fid_digits]", "reference=x.npz", "seeds=[1,1]")
    with pytest.raises(ValueError, match="n must be"):
        evaluate_cmd(tmp_path, "metrics=[fid_digits]", "reference=x.npz", "n=0")
    with pytest.raises(ValueError, match="pass data=... .or ckpt=.... to compute it"):
        evaluate_cmd(tmp_path, "metrics=[fid_digits]", f"reference={tmp_path / 'none.npz'}")
    np.savez(tmp_path / "published.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="has no digits statistics"):
        evaluate_cmd(tmp_path, f"ckpt={digits_model}", "metrics=[fid_digits]", f"reference={tmp_path / 'published.npz'}")
