"""Classifier-free guidance sweep on a text-conditioned shapes checkpoint: adherence, domain FID, diversity.

    python experiments/scripts/guidance_sweep.py --ckpt RUN/checkpoints/last.ckpt [--device cuda]

For each guidance scale, samples (DDIM-50 with x0 clipped to [-1, 1], fixed noise) for captions of colour-shape pairs seen
in training and of the held-out pairs; reports caption adherence for both, ``fid_shapes``
against the training images, and diversity (mean pairwise feature distance among samples of
one caption). Writes JSON, a markdown table and a plot.
"""
from __future__ import annotations

import argparse
import json
import warnings
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffexp.config import data_of_run  # noqa: E402
from diffexp.data.shapes import make_shapes  # noqa: E402
from diffexp.metrics import build_feature_extractor, extract_features, frechet_distance, reference_features  # noqa: E402
from diffexp.metrics.adherence import caption_adherence  # noqa: E402
from diffexp.api import draw_samples, load_model  # noqa: E402
from diffexp.samplers import DDIMSampler  # noqa: E402
from diffexp.viz.images import save_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--scales", nargs="+", type=float, default=[1, 1.5, 2, 3, 5, 7.5])
    parser.add_argument("--n", type=int, default=1000, help="samples per scale for seen and for held-out pairs each")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--diversity", type=int, nargs=2, default=[8, 8], metavar=("CAPTIONS", "SAMPLES"),
                        help="diversity from SAMPLES samples of each of CAPTIONS captions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "guidance_sweep"))
    args = parser.parse_args()

    model, cfg = load_model(args.ckpt, device=args.device)
    dm = data_of_run(cfg)
    dm.setup("fit")
    holdout = [tuple(p) for p in dm.holdout]
    _, seen_captions, _ = make_shapes(args.n, seed=777, exclude=holdout)
    _, held_captions, _ = make_shapes(args.n, seed=778, only=holdout) if holdout else (None, [], None)
    extractor = build_feature_extractor("shapes", args.device)
    real = reference_features(dm, extractor, "shapes", "train")
    n_div, per_div = args.diversity
    diversity_captions = [c for c in seen_captions[:n_div] for _ in range(per_div)]
    sampler = model.make_sampler(partial(DDIMSampler, steps=args.steps, clip_sample=True, progress=False))
    out, rows = Path(args.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    for scale in args.scales:
        seen = draw_samples(model, len(seen_captions), sampler, 0, 500, progress=False, conditions={"captions": seen_captions},
                            guidance_scale=scale)
        held = draw_samples(model, len(held_captions), sampler, 1, 500, progress=False, conditions={"captions": held_captions},
                            guidance_scale=scale) if held_captions else None
        div = draw_samples(model, len(diversity_captions), sampler, 2, 500, progress=False,
                           conditions={"captions": diversity_captions}, guidance_scale=scale)
        feats = extract_features(extractor, div).view(n_div, per_div, -1)
        diversity = float(torch.stack([torch.pdist(f).mean() for f in feats]).mean())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fid = frechet_distance(real, extract_features(extractor, seen))
        seen_adh = caption_adherence(seen, seen_captions)
        held_adh = caption_adherence(held, held_captions) if held is not None else {}
        row = {"guidance_scale": scale, "n": len(seen_captions),
               "adherence_seen": seen_adh["adherence"], "adherence_held_out": held_adh.get("adherence"),
               **{f"held_out_{a}": held_adh.get(f"{a}_accuracy") for a in ("colour", "shape", "position")},
               "fid_shapes": round(fid, 4), "diversity": round(diversity, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_grid(held[:32] if held is not None else seen[:32], out.parent / f"{out.name}_scale{scale:g}.png", nrow=8,
                  scale=3)
    out.with_suffix(".json").write_text(json.dumps({"ckpt": str(args.ckpt), "steps": args.steps, "device": args.device,
                                                    "holdout": holdout, "rows": rows}, indent=2))
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    scales = [r["guidance_scale"] for r in rows]
    a1.plot(scales, [r["adherence_seen"] for r in rows], "o-", label="seen pairs")
    if held_captions:
        a1.plot(scales, [r["adherence_held_out"] for r in rows], "s-", label="held-out pairs")
    a1.set(xlabel="guidance scale", ylabel="caption adherence", title="adherence")
    a1.legend()
    a2.plot(scales, [r["fid_shapes"] for r in rows], "o-", color="C3", label="fid_shapes")
    a2.set(xlabel="guidance scale", ylabel="fid_shapes (lower = closer to data)")
    twin = a2.twinx()
    twin.plot(scales, [r["diversity"] for r in rows], "s--", color="C2", label="diversity")
    twin.set_ylabel("diversity (feature distance within a caption)")
    a2.set_title("quality and diversity")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(table))


if __name__ == "__main__":
    main()
