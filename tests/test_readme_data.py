"""The README's data-at-scale and evaluation commands, as typed, in a fresh working directory."""
from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, readme_command, run_as_typed


@pytest.mark.slow
def test_readme_shard_latent_and_evaluation_commands_as_typed(fresh_workdir):
    (fresh_workdir / "src").symlink_to(ROOT / "src")
    run_as_typed(readme_command("python -m diffexp.make_shards data=digits out=data/digits_shards shard_size=256"),
                 fresh_workdir, shrink=False)
    assert len(list((fresh_workdir / "data" / "digits_shards" / "train").glob("*.tar"))) == 7
    run_as_typed(readme_command("python train.py data=webdataset data.shards='data/digits_shards/train/"
                                "{000000..000006}.tar' data.val_shards=data/digits_shards/val data.image_size=16 "
                                "data.channels=1"), fresh_workdir)
    assert (fresh_workdir / "logs" / "train" / "latest" / "checkpoints" / "last.ckpt").is_file()

    run_as_typed(readme_command("python -m diffexp.evaluate data=digits metrics=[fid_digits,precision_recall_digits] "
                                "reference=data/digits_ref.npz"), fresh_workdir, shrink=False)
    run_as_typed(readme_command("python -m diffexp.evaluate ckpt=src/diffexp/pretrained/digits/model.safetensors "
                                "metrics=[fid_digits,precision_recall_digits] n=1000 seeds=[0,1] sampler=dpmpp_2m "
                                "sampler.steps=10 reference=data/digits_ref.npz out=data/eval_digits"),
                 fresh_workdir, shrink=False)
    report = json.loads((fresh_workdir / "data" / "eval_digits" / "metrics.json").read_text())
    assert len(report["per_seed"]) == 2 and 0 < report["mean"]["fid_digits"] < 5
    assert 0.2 < report["mean"]["precision_digits"] <= 1 and 0.5 < report["mean"]["recall_digits"] <= 1

    run_as_typed(readme_command("python -m diffexp.encode_latents data=shapes data.num_train=2000 vae=own "
                                "vae.ckpt=src/diffexp/pretrained/shapes_vae/model.safetensors "
                                "out=data/shapes_latents"), fresh_workdir, shrink=False)
    manifest = json.loads((fresh_workdir / "data" / "shapes_latents" / "latents.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {"train": 2000, "val": 1000}
    run_as_typed(readme_command("python train.py experiment=shapes_latent "
                                "vae.ckpt=src/diffexp/pretrained/shapes_vae/model.safetensors "
                                "latents=data/shapes_latents"), fresh_workdir)
