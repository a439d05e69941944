"""Training-step and sampling throughput of diffexp's nets against diffusers' of the same layout.

For each U-Net preset (tiny, small, base) a ``UNet2DModel`` with the same layout is built (levels and widths, res
blocks per level, self-attention at the same resolutions, time injection by scale-shift or addition, 32 norm groups,
the same dropout; for ``base`` this is google/ddpm-cifar10-32's layout). For each DiT preset, named with its patch
size as in the paper (``dit_s/2``, ``dit_b/4``; ``--num-classes`` labels, 1,000 as ImageNet), a
``DiTTransformer2DModel`` of the same config (:func:`diffexp.interop_dit.diffusers_dit_config`). Both run the same
step (forward, MSE on epsilon, backward, AdamW, fused on CUDA) on the same batch in each mode:

- ``fp32``: exact float32 (TF32 off); ``channels_last``: the same with channels-last weights and inputs;
  ``tf32``: float32 with TF32 matmuls/convolutions;
- ``bf16``: bf16 autocast; ``bf16_channels_last``: plus channels-last weights and inputs;
- ``bf16_compile``: plus ``torch.compile`` (default mode).

FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward), the share of the
device's dense bf16 peak from :data:`PEAK_BF16_DENSE` (by device name). Rounds alternate ours/diffusers so drift
in machine load hits both; the median round counts. ``--sample`` also times diffexp's samplers
(``--samplers``, e.g. ddim:50) on ``--sample-batch`` images in fp32, bf16, bf16 + compile and bf16 + compile with
CUDA graphs (``reduce-overhead``).

    python experiments/bench/train_speed.py --presets tiny small --image-size 16 --channels 1 --batch 64 \\
        --modes fp32 --json experiments/results/speed/train_speed_cpu.json
    python experiments/bench/train_speed.py --presets base --batch 256 --modes fp32 bf16 bf16_compile --sample \\
        --json experiments/results/speed/train_speed_h200.json  # on a GPU
    python experiments/bench/train_speed.py --presets dit_s/2 --image-size 32 --channels 4 --batch 32 --modes fp32 \\
        --device cpu --json experiments/results/speed/dit_speed_cpu.json
    python experiments/bench/train_speed.py --presets dit_b/2 --image-size 32 --channels 4 --batch 256 \\
        --modes bf16 bf16_compile --json experiments/results/speed/dit_speed_h200.json  # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from diffexp.course import net_preset_config
from diffexp.interop import diffusers_unet_config
from diffexp.interop_dit import diffusers_dit_config
from diffexp.nets import DiT
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
MODES = ("fp32", "channels_last", "tf32", "bf16", "bf16_channels_last", "bf16_compile")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins, so more specific names come first.
PEAK_BF16_DENSE = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "A6000": 155e12,
}


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense bf16 peak in FLOP/s or None when unknown, e.g. on the CPU)."""
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_DENSE.items() if key in name), None)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours(preset: str, image_size: int, channels: int, num_classes: int = 1000):
    """(net, its config) of ``preset``: a net group name, for a DiT with its patch size (``dit_s/2``); DiTs get
    ``num_classes`` labels (diffusers' DiT is class-conditional)."""
    name, _, patch = preset.partition("/")
    cfg = net_preset_config(name)
    cfg.image_size, cfg.in_channels = image_size, channels
    cfg.pop("init_from", None)
    if cfg._target_.endswith("DiT"):
        cfg.num_classes, cfg.patch_size = num_classes, int(patch or cfg.patch_size)
    elif patch:
        raise SystemExit(f"--presets {preset}: only DiT presets take a patch size")
    return instantiate(cfg), cfg


def diffusers_twin(net):
    """``UNet2DModel`` with our U-Net's layout (:func:`diffexp.interop.diffusers_unet_config`: the same widths,
    blocks per level, attention levels, time injection), or ``DiTTransformer2DModel`` with our DiT's config;
    randomly initialised."""
    if isinstance(net, DiT):
        return DiTTransformer2DModel(**diffusers_dit_config(net))
    return UNet2DModel(**diffusers_unet_config(net))


def forward_of(net, module=None):
    """forward(x, t, labels) -> prediction of ``module`` (``net`` or ``net`` compiled), whichever net ``net`` is;
    labels reach class-conditional DiTs only."""
    module = net if module is None else module
    if isinstance(net, UNet2DModel):
        return lambda x, t, y: module(x, t).sample
    if isinstance(net, DiTTransformer2DModel):
        return lambda x, t, y: module(x, timestep=t, class_labels=y).sample
    if isinstance(net, DiT):
        return lambda x, t, y: module(x, t, class_labels=y)
    return lambda x, t, y: module(x, t)


def inputs(net, batch: int, image_size: int, channels: int, device: torch.device, seed: int = 0):
    """(x, t, labels, eps) of one fixed batch: t uniform in [0, 1000), labels below the net's class count."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, image_size, image_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    classes = getattr(net, "num_classes", None) or getattr(getattr(net, "config", None), "num_embeds_ada_norm", None)
    labels = torch.randint(0, classes or 1, (batch,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    return x.to(device), t.to(device), labels.to(device), eps.to(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def prepare(net: torch.nn.Module, mode: str, device: torch.device):
    """(net, forward(x, t, labels) -> prediction, autocast context) for ``mode``."""
    net = copy.deepcopy(net).to(device).train()
    if "channels_last" in mode:
        net = net.to(memory_format=torch.channels_last)
    call = forward_of(net, torch.compile(net) if "compile" in mode else net)
    bf16 = mode.startswith("bf16")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    return net, call, autocast


def training_step_fn(net, mode: str, batch: int, image_size: int, channels: int, device: torch.device):
    """One training step (forward, MSE on eps, backward, AdamW) of ``net`` in ``mode`` on a fixed batch."""
    net, call, autocast = prepare(net, mode, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, t, labels, eps = inputs(net, batch, image_size, channels, device)
    if "channels_last" in mode:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.mse_loss(call(x, t, labels).float(), eps)
        loss.backward()
        opt.step()

    return step


def flops_per_step(net, batch: int, image_size: int, channels: int, device: torch.device) -> int:
    """Forward + backward FLOPs of one training step at this batch (FlopCounterMode counts matmuls/convs)."""
    net = copy.deepcopy(net).to(device).train()
    x, t, labels, _ = inputs(net, batch, image_size, channels, device)
    counter = FlopCounterMode(display=False)
    with counter:
        forward_of(net)(x, t, labels).square().mean().backward()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step, items: int, steps: int, device: torch.device, warmup: int = 3) -> float:
    """Items per second over ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return items * steps / (time.perf_counter() - start)


def train_rows(args, device: torch.device, peak: float | None, rows: list, save=lambda: None) -> list[dict]:
    """Appends one row per (preset, mode) to ``rows``, calling ``save`` after each."""
    for preset in args.presets:
        torch.manual_seed(0)
        net, cfg = ours(preset, args.image_size, args.channels, args.num_classes)
        twin = diffusers_twin(net)
        flops = {"ours": flops_per_step(net, args.batch, args.image_size, args.channels, device),
                 "diffusers": flops_per_step(twin, args.batch, args.image_size, args.channels, device)}
        for mode in args.modes:
            set_tf32(mode not in ("fp32", "channels_last"))
            steps = {"ours": training_step_fn(net, mode, args.batch, args.image_size, args.channels, device),
                     "diffusers": training_step_fn(twin, mode, args.batch, args.image_size, args.channels, device)}
            runs = {"ours": [], "diffusers": []}
            compile_seconds = {}
            for name, step in steps.items():  # the first call compiles / autotunes: timed apart
                start = time.perf_counter()
                step()
                synchronize(device)
                compile_seconds[name] = round(time.perf_counter() - start, 1)
            for _ in range(args.rounds):
                for name, step in steps.items():
                    runs[name].append(throughput(step, args.batch, args.steps, device))
            row = {"preset": preset, "mode": mode, "batch": args.batch, "image_size": args.image_size,
                   "params_ours": n_params(net), "params_diffusers": n_params(twin),
                   "gflop_per_step_ours": round(flops["ours"] / 1e9, 1),
                   "gflop_per_step_diffusers": round(flops["diffusers"] / 1e9, 1),
                   "first_step_seconds": compile_seconds}
            medians = {name: statistics.median(values) for name, values in runs.items()}
            for name, img_s in medians.items():
                row[f"{name}_img_s"] = round(img_s, 2)
                if peak:
                    row[f"{name}_share_of_bf16_peak"] = round(flops[name] / args.batch * img_s / peak, 4)
            row["ratio"] = round(medians["ours"] / medians["diffusers"], 3)  # of the unrounded medians
            row["round_ratios"] = [round(a / b, 3) for a, b in zip(runs["ours"], runs["diffusers"])]
            rows.append(row)
            save()
            share = f" | peak share ours {row['ours_share_of_bf16_peak']:.1%}" if peak else ""
            print(f"{preset:7s} {mode:19s} ours {row['ours_img_s']:9.1f} img/s | diffusers {row['diffusers_img_s']:9.1f}"
                  f" img/s | ratio {row['ratio']:.2f}{share}", flush=True)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    set_tf32(False)
    return rows


def sample_rows(args, device: torch.device, rows: list, save=lambda: None) -> list[dict]:
    """Appends to ``rows``: diffexp's samplers through DiffusionModel.sample with the ``--sample-preset`` net (random weights: speed
    does not depend on them) on ``--sample-batch`` images, per precision/compilation setting."""
    from diffexp.lit import DiffusionModel
    from diffexp.samplers import SAMPLERS
    from diffexp.schedules import get_schedule

    set_tf32(True)
    settings = [("fp32", None), ("bf16", None)] + [("bf16", mode) for mode in args.sample_compile]
    if device.type != "cuda":
        settings = settings[:2]
    for precision, compile_mode in settings:
        torch.manual_seed(0)
        net, _ = ours(args.sample_preset, args.image_size, args.channels)
        model = DiffusionModel(net, get_schedule("linear"), compile=False).to(device)
        if compile_mode:
            model.speed_up(compile=True, mode=compile_mode)
        for spec in args.samplers:
            name, _, steps = spec.partition(":")
            sampler = SAMPLERS[name](model.path, prediction_type="epsilon", steps=int(steps),
                                     progress=False)

            def run(model=model, sampler=sampler, precision=precision):
                model.sample(args.sample_batch, sampler=sampler, generator=torch.Generator().manual_seed(0),
                             precision=precision)

            start = time.perf_counter()
            run()  # compiles / captures graphs
            synchronize(device)
            first = time.perf_counter() - start
            img_s = statistics.median(throughput(run, args.sample_batch, 1, device, warmup=0)
                                      for _ in range(args.sample_rounds))
            row = {"preset": args.sample_preset, "sampler": spec, "nfe": sampler.nfe(), "batch": args.sample_batch,
                   "precision": precision, "compile": compile_mode or False, "img_s": round(img_s, 1),
                   "first_batch_seconds": round(first, 1)}
            rows.append(row)
            save()
            print(f"sample {spec:12s} {precision} compile={compile_mode or False!s:16s} {img_s:8.1f} img/s "
                  f"(first batch {first:.1f} s)", flush=True)
        torch._dynamo.reset()  # the next setting compiles afresh
    set_tf32(False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"],
                        help="net presets; DiTs with their patch size: dit_s/2")
    parser.add_argument("--num-classes", type=int, default=1000, help="class labels of the DiTs")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample", action="store_true", help="also time sampling")
    parser.add_argument("--sample-preset", default="base")
    parser.add_argument("--samplers", nargs="+", default=["ddim:50", "dpmpp_2m:10"])
    parser.add_argument("--sample-batch", type=int, default=1024)
    parser.add_argument("--sample-rounds", type=int, default=2)
    parser.add_argument("--sample-compile", nargs="*", default=["default", "reduce-overhead"],
                        help="torch.compile modes to time sampling with in bf16 (on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name, peak = device_peak(device)
    print(f"device: {name}; dense bf16 peak: {peak / 1e12 if peak else 'unknown'} TFLOP/s; torch {torch.__version__}")
    result = {"device": name, "peak_bf16_dense_flops": peak, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "train": [], "sample": []}

    def save():  # after every row, so a run stopped at its time limit keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))

    train_rows(args, device, peak, result["train"], save)
    if args.sample:
        sample_rows(args, device, result["sample"], save)
    save()


if __name__ == "__main__":
    main()
