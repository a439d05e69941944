"""Pixel vs latent diffusion at the same image resolution (32x32 shapes), in one run.

Both models are built from the real presets: pixel = ``data=shapes net=tiny`` (U-Net on 32x32x3),
latent = ``experiment=shapes_latent`` (the same U-Net family on the 8x8x4 latents of the
``experiment=shapes_vae`` autoencoder, f=4). Measured, interleaved over ``--rounds``:

* training images/s: one optimizer step (loss, backward, AdamW) per batch; the latent model with the
  batch encoded by the VAE every step, and with pre-encoded latents (``cache_latents=true``);
* sampling images/s: DDIM with ``--sample-steps`` steps, plus decoding for the latent model;
* peak memory of each phase above what the process held before it, each phase in a fresh process
  (the allocator keeps freed memory, so phases must not share one): CUDA peak allocated, or on
  the CPU the peak resident set size (VmHWM) above the resident size after building the models.

Ratios are latent / pixel (> 1: latent is faster; < 1: latent uses less memory).

    python experiments/bench/pixel_vs_latent.py [--vae-ckpt RUN/checkpoints/last.ckpt] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from diffexp.config import build_model, instantiate
from diffexp.samplers import DDIMSampler

ROOT = Path(__file__).resolve().parents[2]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_models(vae_ckpt: str | None):
    pixel_cfg = compose_train(["data=shapes", "net=tiny", "schedule=cosine"])
    latent_cfg = compose_train(["experiment=shapes_latent"] + ([f"vae.ckpt={vae_ckpt}"] if vae_ckpt else []))
    if not vae_ckpt:  # random weights of the shapes_vae architecture: speed does not depend on the weights
        vae_net = compose_train(["experiment=shapes_vae"]).model.net
        with open_dict(latent_cfg):
            latent_cfg.vae = OmegaConf.create({"_target_": "diffexp.autoencoders.OwnAutoencoder", "net": vae_net})
    pixel, latent = build_model(pixel_cfg), build_model(latent_cfg)
    if torch.isnan(latent.space.latent_scale):
        latent.space.latent_scale.fill_(1.0)
    return pixel, latent, pixel_cfg


class PeakMemory:
    """Peak memory (MiB) used by a block above what was held when it began."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
            self.base = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.peak = self._status("VmHWM:") - self.base


def train_rate(model, batches, steps: int, device, use_cache: bool) -> float:
    """Images/s of ``steps`` optimizer steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(batch):
        loss = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        step({"latent": batch["latent"]} if use_cache else batch)
    sync(device)
    return steps * len(batches[0]["image"]) / (time.perf_counter() - start)


def sample_rate(model, n: int, steps: int, device) -> float:
    """Images/s of drawing ``n`` samples with DDIM-``steps``."""
    sampler = model.make_sampler(partial(DDIMSampler, steps=steps, progress=False))
    model.sample(2, sampler=sampler, progress=False)  # warm-up
    sync(device)
    start = time.perf_counter()
    model.sample(n, sampler=sampler, generator=torch.Generator().manual_seed(0), progress=False)
    sync(device)
    return n / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    pixel, latent, data_cfg = build_models(args.vae_ckpt)
    pixel, latent = pixel.to(device), latent.to(device)
    with open_dict(data_cfg):
        data_cfg.data.num_train, data_cfg.data.batch_size = 4 * args.batch, args.batch
    datamodule = instantiate(data_cfg.data)
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batch = {"image": batch["image"].to(device)}
        with torch.no_grad():
            batch["latent"] = latent.space.autoencoder.encode_raw(batch["image"])  # what the latent cache holds
        batches.append(batch)
    phases = {
        "pixel_train": lambda: train_rate(pixel, batches, args.train_steps, device, False),
        "latent_train": lambda: train_rate(latent, batches, args.train_steps, device, False),
        "latent_train_cached": lambda: train_rate(latent, batches, args.train_steps, device, True),
        "pixel_sample": lambda: sample_rate(pixel, args.sample_n, args.sample_steps, device),
        "latent_sample": lambda: sample_rate(latent, args.sample_n, args.sample_steps, device),
    }
    return device, pixel, latent, phases


def peak_in_fresh_process(phase: str, argv: list[str]) -> float:
    import subprocess

    out = subprocess.run([sys.executable, __file__, *argv, "--phase", phase], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-ckpt", default=None, help="a shapes_vae checkpoint (default: random weights)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--sample-n", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # worker: one phase's peak memory
    args = parser.parse_args()
    device, pixel, latent, phases = prepare(args)
    if args.phase:
        with PeakMemory(device) as mem:
            phases[args.phase]()
        print(json.dumps({"peak_mib": mem.peak}))
        return
    speed = {key: [] for key in phases}
    for _ in range(args.rounds):  # interleaved, so drifts in machine load hit every phase alike
        for key, phase in phases.items():
            speed[key].append(phase())
    result = {k: {"images_per_s": statistics.median(v), "peak_mib": peak_in_fresh_process(k, sys.argv[1:])}
              for k, v in speed.items()}

    def ratio(a, b, field):
        return result[a][field] / result[b][field]

    ratios = {
        "train_speed latent/pixel": ratio("latent_train", "pixel_train", "images_per_s"),
        "train_speed latent(cached)/pixel": ratio("latent_train_cached", "pixel_train", "images_per_s"),
        "sample_speed latent/pixel": ratio("latent_sample", "pixel_sample", "images_per_s"),
        "train_memory latent/pixel": ratio("latent_train", "pixel_train", "peak_mib"),
        "train_memory latent(cached)/pixel": ratio("latent_train_cached", "pixel_train", "peak_mib"),
        "sample_memory latent/pixel": ratio("latent_sample", "pixel_sample", "peak_mib"),
    }
    params = {"pixel_unet": sum(p.numel() for p in pixel.net.parameters()),
              "latent_unet": sum(p.numel() for p in latent.net.parameters()),
              "vae": sum(p.numel() for p in latent.space.autoencoder.parameters())}
    print(f"device {device}, batch {args.batch}, DDIM-{args.sample_steps} on {args.sample_n}, median of "
          f"{args.rounds} rounds; params {params}")
    for key, value in result.items():
        print(f"  {key:22s} {value['images_per_s']:9.1f} img/s   peak +{value['peak_mib']:8.1f} MiB")
    for key, value in ratios.items():
        print(f"  {key:36s} {value:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "params": params, "results": result,
                                              "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
