"""The fast path: compilation in place, low-precision denoiser calls, fused AdamW, TF32, batched tensor data,
a progress bar that does not wait for the GPU every step, the throughput callback and the benchmarks."""
from __future__ import annotations

import json
import sys
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from diffexp.data.base import BatchedDataset, TensorImageDataset, collate_batch, device_resident
from diffexp.data.latents import LatentDataset
from diffexp.lit import DiffusionModel
from diffexp.lit.base import fused_option
from diffexp.nets import UNet
from diffexp.samplers import DDIMSampler
from diffexp.schedules import get_schedule
from diffexp.train import build, matmul_precision, quiet_progress_bar
from tests.conftest import ROOT, run_script


def small_model(**kwargs) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), attention_levels=[-1], dropout=0.0)
    return DiffusionModel(net, get_schedule("linear", num_timesteps=100), **kwargs)


def test_options_are_checked():
    for kwargs, option in [({"compile": "yes"}, "model.compile"), ({"compile_mode": "fast"}, "model.compile_mode"),
                           ({"channels_last": 1}, "model.channels_last"),
                           ({"sample_precision": "half"}, "model.sample_precision")]:
        with pytest.raises(ValueError, match=option):
            small_model(**kwargs)


def test_compile_in_place_keeps_state_dict_and_parameters():
    """nn.Module.compile: the same parameter objects and state-dict keys (no ``_orig_mod.``), so EMA's
    load_state_dict swaps, checkpoints and DDP see the plain net."""
    model = small_model()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    model.speed_up(compile=True)
    assert model.net._compiled_call_impl is not None
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert not any("_orig_mod" in k for k in model.state_dict())
    model.speed_up(compile=True)  # idempotent


def test_compile_auto_is_off_on_cpu(train_cfg):
    cfg = train_cfg()
    assert cfg.model.compile == "auto"
    datamodule, model, _, _, trainer = build(cfg)
    model.trainer = trainer
    model.setup("fit")
    assert getattr(model.net, "_compiled_call_impl", None) is None


def test_low_precision_denoiser_returns_float32_close_to_fp32():
    model = small_model().eval()
    torch.nn.init.normal_(model.net.conv_out.weight, std=0.1)  # zero-initialised: give the output something
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        exact = model.net_at("fp32")(x, t)
        low = model.net_at("bf16")(x, t)
    assert model.net_at("fp32") is model.net
    assert low.dtype == torch.float32
    assert not torch.equal(low, exact)  # it did run in bf16
    torch.testing.assert_close(low, exact, atol=0.05, rtol=0.05)
    # fp16 autocast does not exist on the CPU: the plain net
    assert model.net_at("fp16") is model.net


def test_sampling_precision_follows_the_trainer():
    model = small_model()
    assert model.resolved_precision("auto") == "fp32"  # outside a Trainer

    class FakeTrainer:
        precision = "bf16-mixed"

    model._trainer = FakeTrainer()
    assert model.resolved_precision("auto") == "bf16"
    assert model.resolved_precision("fp32") == "fp32"
    FakeTrainer.precision = "16-mixed"
    assert model.resolved_precision("auto") == "fp16"
    model._trainer = None
    x_T = torch.randn(2, 1, 8, 8)
    sampler = DDIMSampler(model.schedule, steps=4, progress=False)
    exact = model.sample(2, sampler=sampler, x_T=x_T, precision="fp32")
    low = model.sample(2, sampler=sampler, x_T=x_T, precision="bf16")
    assert low.dtype == torch.float32 and (low - exact).abs().max() < 0.1


def test_fused_adamw_only_for_cuda_parameters():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_option(partial(torch.optim.AdamW, lr=1e-3), cpu) == {}
    assert fused_option(torch.optim.SGD, cpu) == {}

    class CudaLike:
        is_cuda = True

    cuda = [CudaLike()]
    assert fused_option(partial(torch.optim.AdamW, lr=1e-3), cuda) == {"fused": True}
    assert fused_option(torch.optim.Adam, cuda) == {"fused": True}
    assert fused_option(partial(torch.optim.AdamW, foreach=True), cuda) == {}  # the config's own choice wins
    assert fused_option(partial(torch.optim.AdamW, fused=False), cuda) == {}
    assert fused_option(torch.optim.SGD, cuda) == {}
    assert fused_option(partial(torch.optim.AdamW, lr=1e-3), []) == {}


def test_matmul_precision_auto_and_checked(train_cfg):
    cfg = train_cfg()
    _, _, _, _, trainer = build(cfg)
    assert cfg.matmul_precision == "auto" and matmul_precision("auto", trainer) == "highest"
    assert matmul_precision("high", trainer) == "high"
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        matmul_precision("tf32", trainer)


def test_gpu_trainers_turn_on_the_fast_path():
    for name in ("gpu", "ddp"):
        cfg = OmegaConf.load(ROOT / "conf" / "trainer" / f"{name}.yaml")
        assert cfg.precision == "bf16-mixed" and cfg.benchmark is True


def test_batched_tensor_data_equals_item_by_item():
    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randn(10, 1, 4, 4, generator=g), torch.arange(10), [f"c{i}" for i in range(10)])
    order = torch.randperm(10, generator=g).tolist()
    batched = list(DataLoader(BatchedDataset(data), batch_size=4, sampler=order, collate_fn=collate_batch))
    itemwise = list(DataLoader(data, batch_size=4, sampler=order))
    assert len(batched) == len(itemwise) == 3
    for a, b in zip(batched, itemwise):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["caption"] == b["caption"]
    latents = LatentDataset(data, torch.randn(10, 2, 2, 2, generator=g))
    batch = next(iter(DataLoader(BatchedDataset(latents), batch_size=4, sampler=order, collate_fn=collate_batch)))
    assert torch.equal(batch["latent"], latents.latents[order[:4]])
    assert torch.equal(batch["image"], data.images[order[:4]])
    assert latents.nbytes == data.nbytes + latents.latents.nbytes
    # a dataset that is not a tensor dataset cannot be moved: per-item, workers as configured
    assert LatentDataset([{"image": torch.zeros(1)}] * 2, torch.zeros(2, 1)).nbytes is None
    assert not device_resident(data, torch.device("cpu"))


def test_progress_bar_refreshes_at_the_logging_interval():
    trainer_cfg = OmegaConf.create({"enable_progress_bar": True, "log_every_n_steps": 25})
    (bar,) = quiet_progress_bar(trainer_cfg, [])
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == 25
    assert quiet_progress_bar(trainer_cfg, [bar]) == []  # the config's own bar stays
    trainer_cfg.enable_progress_bar = False
    assert quiet_progress_bar(trainer_cfg, []) == []


def test_throughput_callback_writes_steady_state_figures(train_cfg, tmp_path):
    from diffexp.train import run

    cfg = train_cfg("callbacks=[default,throughput]", "callbacks.throughput.skip_steps=1")
    run(cfg)
    result = json.loads((tmp_path / "run" / "throughput.json").read_text())
    assert result["from_step"] == 1 and result["steps"] == 3 and result["steps_per_second"] > 0
    assert result["stamps"]["fit_start"] <= result["stamps"]["first_step"] <= result["stamps"]["train_end"]
    logged = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "train/images_per_second" in logged.splitlines()[0]


def test_throughput_callback_says_when_the_run_is_too_short(train_cfg, tmp_path):
    from diffexp.train import run

    with pytest.warns(UserWarning, match="skip_steps=4"):
        run(train_cfg("callbacks=[default,throughput]", "callbacks.throughput.skip_steps=4"))
    assert not (tmp_path / "run" / "throughput.json").exists()


def test_lr_schedule_settings_fail_when_the_model_is_built(train_cfg):
    for overrides, message in [(["model.lr_scheduler.warmup_steps=x"], "warmup_steps must be an integer"),
                               (["lr_scheduler@model.lr_scheduler=warmup_cosine"], "total_steps follows trainer.max_steps"),
                               (["lr_scheduler@model.lr_scheduler=warmup_cosine", "model.lr_scheduler.warmup_steps=1",
                                 "model.lr_scheduler.min_ratio=x"], "min_ratio must be a number")]:
        with pytest.raises(ValueError, match=message):
            build(train_cfg(*overrides))


@pytest.mark.slow
def test_sample_options_are_checked(tiny_checkpoint, tmp_path):
    for override, message in [("precision=half", "precision must be one of"), ("compile=maybe", "compile must be"),
                              ("compile_mode=fast", "compile_mode must be one of")]:
        result = run_script("sample.py", f"ckpt={tiny_checkpoint}", "n=2", override, f"out={tmp_path / 'x'}",
                            cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-800:]


@pytest.mark.slow
def test_sample_py_bf16_on_cpu(tiny_checkpoint, tmp_path):
    for precision in ("fp32", "bf16"):
        run_script("sample.py", f"ckpt={tiny_checkpoint}", "n=4", "batch_size=2", "sampler.steps=3",
                   f"precision={precision}", f"out={tmp_path / precision}", "metrics=[digits_classifier]",
                   cwd=tmp_path, check=True)
    summary = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert summary["precision"] == "bf16" and summary["compile"] is False and summary["device"] == "cpu"
    assert summary["images_per_second_after_first_batch"] > 0
    import numpy as np

    exact, low = (np.load(tmp_path / p / "samples.npz")["images"].astype(int) for p in ("fp32", "bf16"))
    assert np.abs(exact - low).mean() < 8  # the same images up to bf16 rounding (uint8 levels)


@pytest.mark.slow
def test_compiled_training_resumes_exactly_and_samples(tmp_path):
    """model.compile=true with the inductor backend on the CPU, on the flow formulation (float noise inputs):
    checkpoints hold the plain keys, a run resumed from its step-2 checkpoint ends where the uninterrupted compiled
    run ends, sample.py compile=true matches."""
    common = ["trainer.max_steps=4", "eval_every=2", "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
              "trainer.enable_progress_bar=false", "data.batch_size=8", "callbacks.sample_grid.n=4",
              "callbacks.denoising_grid.num_images=2", "sampler.steps=3", "net.base_channels=16",
              "model.compile=true", "paths.latest_link=null", "trainer.enable_model_summary=false", "formulation=flow"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_script("train.py", *common, f"hydra.run.dir={full}", cwd=tmp_path, check=True, timeout=1500)
    ckpt = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    resumed = [c for c in (full / "checkpoints").glob("*.ckpt") if "0000002" in c.name]
    assert resumed, sorted(p.name for p in (full / "checkpoints").iterdir())
    run_script("train.py", *common, f"hydra.run.dir={part}", f"ckpt_path={resumed[0]}", cwd=tmp_path, check=True,
               timeout=1500)
    again = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["global_step"] == ckpt["global_step"] == 4
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key], value, atol=1e-5, rtol=1e-4)
    out = {}
    for flag in ("false", "true"):
        run_script("sample.py", f"ckpt={full / 'checkpoints' / 'last.ckpt'}", "n=4", "sampler.steps=3",
                   "precision=fp32", f"compile={flag}", f"out={tmp_path / flag}", cwd=tmp_path, check=True,
                   timeout=1500)
        import numpy as np

        out[flag] = np.load(tmp_path / flag / "samples.npz")["images"].astype(int)
    assert np.abs(out["true"] - out["false"]).max() <= 2


@pytest.mark.slow
def test_benchmarks_run_on_the_cpu(tmp_path):
    import subprocess

    speed = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "bench" / "train_speed.py"), "--presets", "tiny",
                    "dit_tiny/4", "--image-size", "16", "--channels", "1", "--batch", "4", "--modes", "fp32", "bf16", "--steps", "1",
                    "--rounds", "1", "--sample", "--sample-preset", "tiny", "--sample-batch", "2", "--samplers",
                    "ddim:2", "--sample-rounds", "1", "--device", "cpu", "--json", str(speed)], check=True, cwd=tmp_path)
    result = json.loads(speed.read_text())
    assert [(r["preset"], r["mode"]) for r in result["train"]] == [("tiny", "fp32"), ("tiny", "bf16"),
                                                                   ("dit_tiny/4", "fp32"), ("dit_tiny/4", "bf16")]
    dit_row = result["train"][2]
    assert dit_row["params_diffusers"] > dit_row["params_ours"] > 0 and dit_row["ratio"] > 0
    memory = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "bench" / "dit_memory.py"), "--preset", "dit_tiny/4",
                    "--image-size", "16", "--channels", "1", "--batch", "2", "--steps", "1", "--device", "cpu",
                    "--json", str(memory)], check=True, cwd=tmp_path)
    rows = json.loads(memory.read_text())["rows"]
    assert [r["checkpointing"] for r in rows] == [False, True] and all(r["peak_gib"] > 0 for r in rows)
    row = result["train"][0]
    assert row["params_ours"] > 0 and row["gflop_per_step_ours"] > 0 and row["ours_img_s"] > 0
    assert {r["precision"] for r in result["sample"]} == {"fp32", "bf16"}
    loop = tmp_path / "loop.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "bench" / "loop_overhead.py"), "trainer.max_steps=30",
                    "eval_every=15", "data.batch_size=16", "callbacks.sample_grid.n=4", "sampler.steps=3",
                    "callbacks.throughput.skip_steps=5", "--bare-steps", "5", "--warmup", "1", "--json", str(loop)],
                   check=True, cwd=tmp_path, timeout=900)
    result = json.loads(loop.read_text())
    assert result["loop_steps_per_second"] > 0 and result["bare_steps_per_second"] > 0
    parts = {r["part"] for r in result["budget"]}
    for part in ("start-up", "net steps, bare", "Lightning's training step", "validation loop", "rest"):
        assert any(p.startswith(part) for p in parts), (part, parts)
    assert abs(sum(r["seconds"] for r in result["budget"]) - result["wall_seconds"]) < 1.0


def test_warmup_cosine_schedule():
    """lr factor: linear warm-up, then (1 + cos(pi p)) / 2 scaled into [min_ratio, 1], flat after total_steps."""
    import math

    from diffexp.lit.base import warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_ratio=0.1)
    factor = sched.lr_lambdas[0]
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    for bad in [{"warmup_steps": 10, "total_steps": 10}, {"total_steps": 100, "min_ratio": 2.0}]:
        with pytest.raises(ValueError, match="model.lr_scheduler"):
            warmup_cosine(opt, **bad)
