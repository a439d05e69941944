"""Training throughput of diffexp's U-Nets against diffusers.UNet2DModel of the same size, in one run.

For each of our presets (tiny, small) a diffusers UNet2DModel with the same layout (levels,
res blocks per level, attention at the lowest level, scale-shift time injection, 32 norm
groups) is built at the width whose parameter count is closest to ours. Each network runs the same training step
(forward, MSE on epsilon, backward, AdamW step) on the same batch; we report images/s and the
ratio ours / diffusers (>= 1.0 means we are at least as fast).

    python experiments/bench/unet_throughput.py [--batch 64] [--steps 20] [--rounds 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours(preset: str, image_size: int, channels: int):
    cfg = OmegaConf.load(ROOT / "conf" / "unet" / f"{preset}.yaml")
    cfg.image_size, cfg.in_channels = image_size, channels
    return instantiate(cfg), cfg


def diffusers_like(cfg, image_size: int, channels: int, target: int) -> UNet2DModel:
    """UNet2DModel with our layout (levels, blocks, attention at the lowest level, time scale-shift).

    Widths are tried in multiples of 32 (GroupNorm with 32 groups, as ours) starting from ours;
    the one whose parameter count is closest to ``target`` wins.
    """
    levels = len(cfg.channel_mult)
    down = ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1)

    def build(width):
        return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                           layers_per_block=cfg.num_res_blocks, block_out_channels=[width * m for m in cfg.channel_mult],
                           down_block_types=down, up_block_types=up, norm_num_groups=32,
                           resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
                           attention_head_dim=width * cfg.channel_mult[-1] // cfg.num_heads)

    return min((build(w) for w in range(32, 4 * cfg.base_channels + 1, 32)), key=lambda m: abs(n_params(m) - target))


def throughput(step, batch: int, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def training_step_fn(net, call, batch, image_size, channels, device):
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, image_size, image_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    eps = torch.randn(x.shape, generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(call(net, x, t), eps)
        loss.backward()
        opt.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows = []
    for preset in args.presets:
        net, cfg = ours(preset, args.image_size, args.channels)
        ref = diffusers_like(cfg, args.image_size, args.channels, n_params(net))
        ours_step = training_step_fn(net, lambda m, x, t: m(x, t), args.batch, args.image_size, args.channels,
                                     args.device)
        ref_step = training_step_fn(ref, lambda m, x, t: m(x, t).sample, args.batch, args.image_size,
                                    args.channels, args.device)
        # interleaved rounds so drift in machine load affects both alike; the median round counts
        ours_runs, ref_runs = [], []
        for _ in range(args.rounds):
            ours_runs.append(throughput(ours_step, args.batch, args.steps))
            ref_runs.append(throughput(ref_step, args.batch, args.steps))
        row = {"preset": preset, "device": args.device, "batch": args.batch, "image_size": args.image_size,
               "params_ours": n_params(net), "params_diffusers": n_params(ref),
               "ours_img_s": round(statistics.median(ours_runs), 1),
               "diffusers_img_s": round(statistics.median(ref_runs), 1)}
        row["ratio"] = round(row["ours_img_s"] / row["diffusers_img_s"], 3)
        rows.append(row)
        print(f"{preset:6s} params {row['params_ours'] / 1e6:.2f}M vs {row['params_diffusers'] / 1e6:.2f}M | "
              f"ours {row['ours_img_s']:8.1f} img/s | diffusers {row['diffusers_img_s']:8.1f} img/s | "
              f"ratio {row['ratio']:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
