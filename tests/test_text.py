"""Text conditioning: encoders (learned, MiniLM, tiny CLIP/T5 from local files), cross-attention, guidance,
shapes data and caption adherence, prompts in sample.py."""
from __future__ import annotations

import pytest
import torch

from diffexp.data.shapes import COLOURS, POSITIONS, SHAPES, ShapesDataModule, describe, make_shapes, render
from diffexp.metrics.adherence import caption_adherence, parse_caption
from diffexp.nets import UNet
from diffexp.text import LearnedTextEncoder, PretrainedTextEncoder
from tests.conftest import SHRINK, compose_config, tiny_hf_folder

@pytest.mark.parametrize("kind,dim", [("clip", 32), ("t5", 24)])
def test_clip_and_t5_paths_from_local_files(tmp_path, kind, dim):
    encoder = PretrainedTextEncoder(kind, name_or_path=str(tiny_hf_folder(tmp_path, kind)), max_length=8,
                                    local_files_only=True)
    out = encoder(["a small red circle in the top left", ""])
    assert encoder.dim == dim and out.tokens.shape == (2, 8, dim) and out.pooled.shape == (2, dim)
    assert out.mask[0].sum() > out.mask[1].sum()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.state_dict() == {}  # frozen weights stay out of checkpoints
    again = encoder(["a small red circle in the top left"])  # served from the per-caption cache
    assert torch.equal(again.tokens[0], out.tokens[0]) and len(encoder._cache) == 2


def test_missing_hub_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="name_or_path to a local folder"):
        PretrainedTextEncoder("clip", name_or_path="openai/clip-vit-base-patch32", local_files_only=True)
    with pytest.raises(ValueError, match="allowed"):
        PretrainedTextEncoder("bert")


def test_minilm_is_real_and_offline():
    encoder = PretrainedTextEncoder("minilm")
    out = encoder(["a red circle", "a red circle at the top", "a handwritten digit seven"])
    assert encoder.dim == 384
    sim = torch.nn.functional.cosine_similarity(out.pooled[0:1], out.pooled[1:])
    assert sim[0] > sim[1]  # pretrained: related captions are closer


def test_learned_encoder_vocab_and_state():
    encoder = LearnedTextEncoder(dim=16, layers=1, heads=2, max_length=8)
    encoder.fit_vocabulary(["a small red circle", "a large blue square"])
    out = encoder(["a small red circle", "", "a purple circle"])
    assert out.tokens.shape == (3, 8, 16) and out.mask.sum(1).tolist() == [4, 1, 3]
    restored = LearnedTextEncoder(dim=16, layers=1, heads=2, max_length=8)
    restored.load_state_dict(encoder.state_dict())
    assert restored.vocab == encoder.vocab
    assert torch.allclose(restored(["a small red circle"]).tokens, encoder(["a small red circle"]).tokens)


def test_cross_attention_uses_text_and_mask():
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), attention_levels=(-1,), num_heads=2, context_dim=12, dropout=0.0)
    for module in net.modules():  # the output projections start at zero
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.2)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    ctx, mask = torch.randn(2, 4, 12), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    out = net(x, t, context=ctx, context_mask=mask)
    assert not torch.allclose(out, net(x, t, context=torch.randn(2, 4, 12), context_mask=mask))
    padded = ctx.clone()
    padded[0, 2:] = 100.0  # masked tokens must not matter
    assert torch.allclose(out[0], net(x, t, context=padded, context_mask=mask)[0], atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        net(x, t)
    with pytest.raises(ValueError, match="context_dim"):
        net(x, t, context=torch.randn(2, 4, 7))


def test_shapes_data_deterministic_with_holdout():
    dm = ShapesDataModule(num_train=300, num_val=50, holdout=[["red", "circle"]])
    dm.setup()
    again = ShapesDataModule(num_train=300, num_val=50, holdout=[["red", "circle"]])
    again.setup()
    assert torch.equal(dm.train_set.images, again.train_set.images)
    assert dm.train_set.images.shape == (300, 3, 32, 32) and dm.train_set.images.abs().max() <= 1
    assert not any("red circle" in c for c in dm.train_set.captions)
    assert all("red circle" in c for c in dm.held_out_set.captions)
    item = dm.train_set[0]
    assert set(item) == {"image", "label", "caption"}
    with pytest.raises(ValueError, match="holdout"):
        ShapesDataModule(holdout=[["purple", "circle"]])
    assert len(COLOURS) >= 6 and len(POSITIONS) == 9


@pytest.mark.slow
def test_adherence_reads_back_real_images():
    images, captions, _ = make_shapes(500, seed=11)
    result = caption_adherence(images, captions)
    assert result["adherence"] >= 0.98 and result["n"] == 500
    assert caption_adherence(images, captions[1:] + captions[:1])["adherence"] < 0.2
    assert describe(torch.full((3, 32, 32), -0.88)) is None  # empty background
    assert parse_caption("a blue square in the center") == {"colour": "blue", "shape": "square", "position": "center"}
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a dog")
    for shape in SHAPES:
        assert describe(render("red", shape, "center", "large"))["shape"] == shape


@pytest.mark.slow
def test_star_is_a_new_shape_behind_an_option_and_the_reader_is_unchanged_for_the_others(monkeypatch):
    import diffexp.data.shapes as shapes_module
    from diffexp.data.shapes import ALL_SHAPES, NEW_SHAPES

    assert "star" in NEW_SHAPES and "star" not in SHAPES
    default = ShapesDataModule(num_train=200, num_val=20)
    default.setup()
    assert not any("star" in c for c in default.train_set.captions)  # the default data never draws one
    stars = ShapesDataModule(num_train=60, num_val=10, shapes=["star"], holdout=[])
    stars.setup()
    assert all(" star " in c for c in stars.train_set.captions)
    assert (stars.train_set.labels == ALL_SHAPES.index("star")).all()
    assert caption_adherence(stars.train_set.images, stars.train_set.captions)["adherence"] >= 0.98
    assert parse_caption("a large cyan star in the top")["shape"] == "star"
    images, _, labels = make_shapes(300, seed=5)
    with_star = [describe(image) for image in images]
    monkeypatch.setattr(shapes_module, "ALL_SHAPES", SHAPES)  # the reader before the star existed
    assert [describe(image) for image in images] == with_star
    assert [r["shape"] for r in with_star] == [SHAPES[int(i)] for i in labels[:, 1]]
    for bad in (["hexagon"], [], ["star", "star"]):
        with pytest.raises(ValueError, match="data.shapes must list distinct shapes"):
            ShapesDataModule(shapes=bad)


def test_text2img_train_and_sample_with_prompt(tmp_path):
    from diffexp.sample import run as sample_run
    from diffexp.train import run as train_run

    run_dir = tmp_path / "run"
    cfg = compose_config("train", SHRINK + ["experiment=shapes_text2img", "data.num_train=64", "data.num_val=16",
                                             "trainer.max_steps=2", "callbacks.sample_grid.n=2"], run_dir)
    assert cfg.text_encoder._target_.endswith("LearnedTextEncoder")
    train_run(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    summary = sample_run(compose_config("sample", [f"ckpt={ckpt}", "n=3", "sampler.steps=2", "progress=false",
                                                   "prompt=a small red circle in the top left", "guidance_scale=2",
                                                   f"out={out}", "device=cpu"], tmp_path / "s"))
    assert summary["prompts"] == ["a small red circle in the top left"] and summary["guidance_scale"] == 2
    import numpy as np

    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (3, 32, 32, 3) and list(saved["captions"]) == ["a small red circle in the top left"] * 3


def test_text_encoder_group_sets_context_dim(tmp_path):
    from diffexp.train import build

    cfg = compose_config("train", SHRINK + ["data=shapes", "data.num_train=8", "data.num_val=4",
                                             "text_encoder=minilm"], tmp_path)
    _, model, *_ = build(cfg)
    assert model.net.context_dim == 384 == cfg.net.context_dim


@pytest.mark.parametrize("experiment,encoder", [("shapes_text2img", "LearnedTextEncoder"),
                                                ("shapes_text2img_minilm", "PretrainedTextEncoder"),
                                                ("shapes_text2img_gpu", "LearnedTextEncoder")])
def test_text_presets_compose(tmp_path, experiment, encoder):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    assert cfg.data._target_.endswith("ShapesDataModule") and cfg.text_encoder._target_.endswith(encoder)
    assert cfg.model.prediction_type == "v_prediction" and cfg.conditioning.p_uncond == 0.1
    assert cfg.conditioning._target_.endswith("TextConditioner")


def test_p_uncond_drops_captions_at_its_rate():
    from diffexp.conditioning import TextConditioner

    encoder = LearnedTextEncoder(dim=8, layers=1, heads=2, max_length=4)
    encoder.fit_vocabulary(["a red circle"])
    conditioner = TextConditioner(encoder, p_uncond=0.3)
    seen = []
    conditioner.embed = lambda captions, device: seen.extend(captions) or {}
    torch.manual_seed(0)
    for _ in range(20):
        conditioner.from_batch({"caption": ["a red circle"] * 100}, drop=True)
    assert abs(seen.count("") / len(seen) - 0.3) < 0.02
    seen.clear()
    conditioner.from_batch({"caption": ["a red circle"] * 100}, drop=False)
    assert "" not in seen


def test_bad_prompts_and_encoder_names(tmp_path):
    from omegaconf import OmegaConf

    from diffexp.sample import read_prompts

    with pytest.raises(FileNotFoundError, match="prompts_file"):
        read_prompts(OmegaConf.create({"prompts_file": str(tmp_path / "none.txt")}), 4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(OmegaConf.create({"prompts_file": str(empty)}), 4)
    both = OmegaConf.create({"prompt": "a red circle", "prompts_file": str(empty)})
    with pytest.raises(ValueError, match="either prompt"):
        read_prompts(both, 4)
    listed = tmp_path / "p.txt"
    listed.write_text("a red circle\na blue square\n")
    assert read_prompts(OmegaConf.create({"prompts_file": str(listed)}), 3) == ["a red circle", "a blue square",
                                                                                 "a red circle"]
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="text_encoder"):
        compose_config("train", ["text_encoder=bert"], tmp_path)
