"""The course models shipped in src/diffexp/pretrained/: present, small, loadable, and as good as their cards say."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from diffexp.course import pretrained, pretrained_or_train, sampler
from diffexp.pretrained import HERE, MODELS, WEIGHTS, available, path

LIMIT_BYTES = 40 * 10**6  # all shipped course models together: at most 40 MB (issue 30)


def test_every_course_model_is_shipped_small_in_float16_with_a_card():
    assert available() == list(MODELS)
    total = 0
    for name in MODELS:
        folder = HERE / name
        total += sum(f.stat().st_size for f in folder.iterdir())
        with safe_open(str(folder / WEIGHTS), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            config = json.loads(f.metadata()["diffexp_config"])
        assert "F16" in dtypes and dtypes <= {"F16", "F32", "I64"}, (name, dtypes)
        card = (folder / "README.md").read_text()
        for override in MODELS[name].overrides[:1]:
            assert f"python train.py {override}" in card
        assert "commit" in card and "Measured" in card
        figures = json.loads((folder / "figures.json").read_text())
        assert figures and all(isinstance(v, float) for v in figures.values())
        assert (folder / "metrics.csv").read_text().startswith("epoch,")
        assert config["trainer"]["max_steps"] >= 1000  # the presets' full runs, not notebook-length ones
        assert not (config.get("vae") or {}).get("ckpt")  # a latent model carries its autoencoder
    assert total <= LIMIT_BYTES, f"shipped models take {total / 1e6:.1f} MB"


def test_pretrained_names_and_errors():
    with pytest.raises(ValueError, match="choose from"):
        pretrained("imagenet")
    vae, cfg = pretrained("shapes_vae")
    assert vae.latent_channels == 4 and cfg.model._target_.endswith("VAETraining")
    model, cfg = pretrained("shapes_latent")
    assert model.sample_shape == (4, 8, 8)
    x = model.sample(2, sampler(model, "ddim", 5), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1


# the U-Net follows every caption (1.00 on N = 500, DDIM-10), the DiT 0.63 (its card; 0.66 on these 64); a random
# colour (6), shape (4), size (2) and position (9) matches a caption naming all four 1 time in 432
@pytest.mark.slow
@pytest.mark.parametrize("name,least", [("shapes_text", 0.9), ("shapes_dit", 0.45)])
def test_shipped_text_models_follow_captions(name, least):
    """Caption adherence on 64 validation captions at guidance 3 with a few-step sampler (DDIM-10)."""
    from diffexp.config import data_of_run
    from diffexp.metrics.adherence import caption_adherence

    model, cfg = pretrained(name)
    captions = data_of_run(cfg).captions("val")[:64]
    images = model.sample(64, sampler(model, "ddim", 10), generator=torch.Generator().manual_seed(0),
                          guidance_scale=3.0, captions=captions)
    adherence = caption_adherence(images, captions)["adherence"]
    assert adherence >= least, adherence


def test_shipped_digits_model_draws_digits():
    from diffexp.metrics import evaluate

    model, _ = pretrained("digits")
    images = model.sample(64, sampler(model, "ddim", 20), generator=torch.Generator().manual_seed(1))
    assert evaluate(["digits_classifier"], images)["digits_classifier"]["confident_fraction"] >= 0.7


def test_notebooks_use_the_shipped_model_unless_asked_to_train(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFEXP_NOTEBOOK_TRAIN", raising=False)
    assert pretrained_or_train("digits", ["experiment=quickstart"], tmp_path / "run") == path("digits")
    own = tmp_path / "run" / "checkpoints" / "last.ckpt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")  # a finished run of one's own is reused, not retrained
    monkeypatch.setenv("DIFFEXP_NOTEBOOK_TRAIN", "1")
    assert pretrained_or_train("digits", ["experiment=quickstart"], tmp_path / "run") == own
