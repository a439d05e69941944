"""Fine-tuning: init_from=, LoRA adapters through peft (train only adapters, save/load/merge), vocabulary extension."""
from __future__ import annotations

import pytest
import torch

from diffexp.checkpoints import CheckpointError
from diffexp.lit import DiffusionModel
from diffexp.nets import UNet
from diffexp.schedules import get_schedule


def attention_model(levels=(-1,), **lora) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), attention_levels=list(levels), dropout=0.0)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised: give the net an output
    return DiffusionModel(net, get_schedule("linear", num_timesteps=100), lora=lora or None)


def train_steps(model: DiffusionModel, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        batch = {"image": torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1}
        loss = model.loss(batch, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_trains_only_the_adapters_and_the_base_weights_stay_bit_identical():
    model = attention_model(rank=4)
    base = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "lora_" not in k}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    assert model.lora_layers["net"] and all(name.rsplit(".", 1)[-1] in ("qkv", "proj")
                                            for name in model.lora_layers["net"])
    before = {k: v.clone() for k, v in model.adapter_state_dict().items() if torch.is_tensor(v)}
    train_steps(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # weight decay did not touch frozen weights
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_lora_starts_as_the_base_model_and_merging_keeps_the_function():
    from diffexp.lora import merge_lora

    plain = attention_model()
    adapted = attention_model(rank=4, alpha=8)
    from diffexp.lora import base_key

    plain_state = plain.state_dict()
    adapted.load_state_dict({**adapted.state_dict(), **{k: plain_state[base_key(k)] for k in adapted.state_dict()
                                                       if "lora_" not in k}})
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 80])
    torch.testing.assert_close(adapted.net(x, t), plain.net(x, t))  # B = 0 at the start
    train_steps(adapted, 3)
    before_merge = adapted.net(x, t)
    assert not torch.allclose(before_merge, plain.net(x, t))
    assert merge_lora(adapted) == len(adapted.lora_layers["net"]) > 0
    torch.testing.assert_close(adapted.net(x, t), before_merge, atol=1e-5, rtol=1e-5)


def test_bad_lora_settings_and_targets_without_attention_give_clear_errors():
    message = r"target_modules=\['to_q', 'to_kv'\] match no layer.*'qkv'.*cross-attention, text models only"
    with pytest.raises(ValueError, match=message):
        attention_model(rank=4, target_modules=["to_q", "to_kv"])  # cross-attention: an unconditional net has none
    from diffexp.lora import LoraSettings, add_lora

    with pytest.raises(ValueError, match=r"match no layer.*layers it has: \['0', '2'\]"):
        add_lora({"net": torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3))},
                 LoraSettings(rank=2))
    for bad, message in [({"rank": -1}, "model.lora.rank"), ({"rank": 2, "alpha": 0}, "model.lora.alpha"),
                         ({"rank": 2, "target_modules": "qkv"}, "target_modules"),
                         ({"rank": 2, "dropout": 1.0}, "model.lora.dropout"), ({"rank": 2, "size": 3}, "not \\['size'\\]")]:
        with pytest.raises(ValueError, match=message):
            attention_model(**bad)
    model = attention_model(rank=2, target_modules=["conv1", "conv2"])  # convolutions adapt too
    assert len(model.lora_layers["net"]) > 0
    with pytest.raises(ValueError, match="already has LoRA"):
        model.add_lora({"rank": 2})


def test_learned_vocabulary_is_extended_without_changing_ids():
    from diffexp.text import LearnedTextEncoder

    encoder = LearnedTextEncoder(dim=8, layers=1, heads=2, max_length=6, max_vocab=12)
    encoder.fit_vocabulary(["a red circle", "a blue square"])
    ids_before, _ = encoder.tokenize(["a red circle", "a blue star"])
    assert ids_before[1, 2] == 1  # "star" is <unk> before
    known_rows = encoder.embed.weight[:8].clone()
    assert encoder.extend_vocabulary(["a red star", "a zebra circle"]) == ["star", "zebra"]
    assert torch.equal(encoder.embed.weight[:8], known_rows)  # known words keep their vectors
    mean = known_rows[3:8].mean(0)
    assert torch.equal(encoder.embed.weight[8], mean) and torch.equal(encoder.embed.weight[9], mean)
    assert encoder.vocab[:8] == ["<pad>", "<unk>", "<empty>", "a", "blue", "circle", "red", "square"]
    ids_after, _ = encoder.tokenize(["a red circle", "a blue star"])
    assert torch.equal(ids_after[0], ids_before[0]) and ids_after[1, 2] == encoder.vocab.index("star")
    with pytest.raises(ValueError, match="max_vocab=12 is too small"):
        encoder.extend_vocabulary(["one two three"])


def test_init_from_a_different_architecture_names_the_differing_keys(train_cfg, tiny_checkpoint):
    from diffexp.train import build

    cfg = train_cfg(f"init_from={tiny_checkpoint}", "net.base_channels=24")
    with pytest.raises(CheckpointError, match=r"another architecture.*shapes differ: net\.\S+ \(\d+"):
        build(cfg)
    cfg = train_cfg(f"init_from={tiny_checkpoint.parent / 'missing.ckpt'}")
    with pytest.raises(FileNotFoundError, match="init_from="):
        build(cfg)


def test_init_from_loads_ema_weights_and_lora_fine_tuning_saves_a_small_adapter(train_cfg, tiny_checkpoint, tmp_path):
    """train.py init_from=CKPT model.lora.rank=4, then sample.py ckpt=BASE lora=ADAPTER == the run == merged."""
    from omegaconf import OmegaConf

    from diffexp.callbacks.ema import ema_state_from_checkpoint
    from diffexp.checkpoints import load_file
    from diffexp.sample import run as sample_run
    from diffexp.train import build, run
    from tests.conftest import compose_config

    base_checkpoint = load_file(tiny_checkpoint)
    ema = ema_state_from_checkpoint(base_checkpoint)
    _, model, *_ = build(train_cfg(f"init_from={tiny_checkpoint}"))
    state = model.state_dict()
    assert ema and all(torch.equal(state[k], v) for k, v in ema.items())  # EMA weights by default
    _, raw_model, *_ = build(train_cfg(f"init_from={tiny_checkpoint}", "init_from_ema=false"))
    assert all(torch.equal(raw_model.state_dict()[k], v) for k, v in base_checkpoint["state_dict"].items()
               if torch.is_tensor(v))

    cfg = train_cfg(f"init_from={tiny_checkpoint}", "model.lora.rank=4")
    run(cfg)
    run_dir = tmp_path / "run"
    adapter = run_dir / "checkpoints" / "adapter.safetensors"
    assert adapter.is_file() and adapter.stat().st_size < 64 * 1024
    tuned = load_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    from diffexp.lora import base_key

    frozen = {base_key(k): v for k, v in tuned.items() if torch.is_tensor(v) and "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in ema.items())  # the base weights did not move
    outs = {}
    for name, extra in {"adapter": [f"ckpt={tiny_checkpoint}", f"lora={adapter}"],
                        "merged": [f"ckpt={tiny_checkpoint}", f"lora={adapter}", "lora_merge=true"],
                        "run": [f"ckpt={run_dir / 'checkpoints' / 'model.safetensors'}"]}.items():
        cfg_s = compose_config("sample", extra + ["n=4", "sampler.steps=4", "progress=false",
                                                  f"out={tmp_path / name}"], tmp_path / f"s_{name}")
        summary = sample_run(cfg_s)
        outs[name] = __import__("numpy").load(tmp_path / name / "samples.npz")["images"].astype(int)
        assert summary["lora"] == (str(adapter) if name != "run" else None)
    assert abs(outs["adapter"] - outs["run"]).max() == 0
    assert abs(outs["adapter"] - outs["merged"]).max() <= 1  # merged weights: the same function up to rounding
    from diffexp.finetune import load_adapter
    from diffexp.api import load_model

    other, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        other.net.conv_in.weight.add_(0.01)  # the same architecture, other weights
    with pytest.warns(UserWarning, match="trained on other weights of this architecture"):
        load_adapter(other, adapter)
    foreign = attention_model()  # another architecture: refused, and left as it was
    with pytest.raises(CheckpointError, match=f"trained on a different model \\(base: {tiny_checkpoint}\\)"):
        load_adapter(foreign, adapter)
    assert foreign.lora is None and all(p.requires_grad for p in foreign.parameters())
    bad = compose_config("sample", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"lora={adapter}",
                                    f"out={tmp_path / 'bad'}"], tmp_path / "s_bad")
    with pytest.raises(CheckpointError, match="already carries LoRA"):
        sample_run(bad)
    assert OmegaConf.select(cfg, "model.lora.rank") == 4
