"""Reconstruction quality of a trained autoencoder on held-out images: PSNR (and LPIPS if its weights exist).

    python experiments/scripts/evaluate_vae.py --ckpt RUN/checkpoints/last.ckpt [--n 1000] [--out results.json]

Uses the validation split of the checkpoint's own data config (for shapes: images generated from a
different seed than the training set).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchmetrics.functional.image import peak_signal_noise_ratio

from diffexp.config import data_of_run
from diffexp.autoencoders import load_autoencoder
from diffexp.checkpoints import CONFIG_KEY, read_checkpoint
from diffexp.images import save_grid


def held_out_reconstructions(ckpt, n: int = 1000, batch: int = 250):
    """(autoencoder, up to ``n`` validation images of its run's data, their reconstructions from the posterior
    mean, per-image PSNR in dB over the [-1, 1] range)."""
    cfg = OmegaConf.create(read_checkpoint(ckpt, "--ckpt")[CONFIG_KEY])
    net = load_autoencoder(ckpt)
    datamodule = data_of_run(cfg)
    datamodule.setup("fit")
    images = torch.stack([datamodule.val_set[i]["image"] for i in range(min(n, len(datamodule.val_set)))])
    with torch.no_grad():
        recon = torch.cat([net(x, sample_posterior=False)[0].clamp(-1, 1) for x in images.split(batch)])
    return net, images, recon, peak_signal_noise_ratio(recon, images, data_range=2.0, reduction="none", dim=(1, 2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--out", default=None, help="JSON results (a reconstruction grid is written beside it)")
    args = parser.parse_args()
    net, images, recon, psnr = held_out_reconstructions(args.ckpt, args.n, args.batch)
    n = len(images)
    result = {"ckpt": str(args.ckpt), "n": n, "downsampling_factor": net.downsampling_factor,
              "latent_shape": [net.latent_channels, net.latent_size, net.latent_size],
              "psnr_mean_db": psnr.mean().item(), "psnr_median_db": psnr.median().item(),
              "psnr_min_db": psnr.min().item()}
    try:
        from diffexp.metrics.scores import lpips_distance, lpips_model

        result["lpips"] = lpips_distance(lpips_model(), recon, images).mean().item()
    except FileNotFoundError as e:
        result["lpips"] = f"not computed: {e}"
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        save_grid(torch.cat([images[:16], recon[:16]]), out.with_suffix(".png"), nrow=16, scale=2)


if __name__ == "__main__":
    main()
