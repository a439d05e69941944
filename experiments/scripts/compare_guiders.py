"""Guiders on a text-to-image shapes checkpoint: caption adherence and fid_shapes against guidance scale per guider.

    python experiments/scripts/compare_guiders.py --ckpt src/diffexp/pretrained/shapes_text/model.safetensors \\
        --guide GUIDE_CKPT --n 200 --steps 8 --out experiments/results/guiders/shapes

Every row samples the same N validation captions from the same x_T with DDIM (``--steps``, trailing spacing; DDIM
steps from the pair (x0, eps), so CFG++ is exact with it) under one guider at one scale: ``cfg``, ``interval``,
``apg`` and, with ``--guide``, ``auto`` (autoguidance with that weaker checkpoint) at each of ``--scales``; ``cfgpp``
at each of ``--lambdas``. Rows report the net's forward passes per image (CFG: 2 per step; interval: 1 outside
its interval), so guiders are compared at equal cost. Writes OUT.{json,md,png}; ``--resume`` keeps rows already
there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffexp.api import draw_samples, load_model, make_guider  # noqa: E402
from diffexp.config import data_of_run, reported_errors  # noqa: E402
from diffexp.guiders import GUIDERS  # noqa: E402
from diffexp.metrics import evaluate  # noqa: E402
from diffexp.metrics.adherence import caption_adherence  # noqa: E402
from diffexp.samplers import DDIMSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "scripts"))
from evaluate_samplers import conditions_for  # noqa: E402

STYLE = {"cfg": "o-", "interval": "s-", "apg": "^-", "auto": "D-", "cfgpp": "v-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--guide", help="autoguidance's guide checkpoint (a weaker model of the same preset)")
    parser.add_argument("--guiders", nargs="+", default=["cfg", "interval", "apg", "auto", "cfgpp"])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "guiders" / "shapes"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    with reported_errors():
        run(args)


def run(args) -> None:
    if "auto" in args.guiders and not args.guide:
        raise ValueError("--guiders includes auto: give its guide checkpoint with --guide")
    out = Path(args.out)
    if out.with_suffix(".json").exists() and not args.resume:
        raise FileExistsError(f"--out {out} already holds results; add --resume or choose another --out")
    model, cfg = load_model(args.ckpt, device=args.device)
    datamodule = data_of_run(cfg)
    conditions = conditions_for(model, datamodule, args.n)
    sampler = model.make_sampler(partial(DDIMSampler, steps=args.steps, timestep_spacing="trailing", progress=False))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if args.resume and out.with_suffix(".json").is_file() else []
    done = {(r["guider"], r["scale"]) for r in rows}
    guide = None
    for name in args.guiders:
        for scale in args.lambdas if name == "cfgpp" else args.scales:
            if (name, scale) in done:
                continue
            if name == "auto":  # the guide loaded and checked once, then shared by every scale
                guider = GUIDERS["auto"](scale=scale, guide_ckpt=args.guide)
                guider.guide_model = guide
                guider = make_guider(guider, model)
                guide = guider.guide_model
            else:
                guider = make_guider(name, model, scale=scale)
            start = time.perf_counter()
            images = draw_samples(model, args.n, sampler, args.seed, args.n, conditions=conditions, progress=False,
                                  guider=guider)
            seconds = time.perf_counter() - start
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fid = evaluate(["fid_shapes"], images, datamodule)["fid_shapes"]["value"]
            row = {"guider": name, "scale": scale, "steps": args.steps, "n": args.n,
                   "net_passes": model.last_net_passes, "fid_shapes": round(fid, 4),
                   "adherence": caption_adherence(images, conditions["captions"])["adherence"],
                   "seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(rows, out, args)
    write(rows, out, args)


def write(rows: list[dict], out: Path, args) -> None:
    order = {name: i for i, name in enumerate(GUIDERS)}
    rows = sorted(rows, key=lambda r: (order.get(r["guider"], len(order)), r["scale"]))  # resumed rows in place
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"ckpt": args.ckpt, "guide": args.guide, "steps": args.steps,
                                                    "n": args.n, "seed": args.seed, "rows": rows}, indent=2))
    keys = ["guider", "scale", "net_passes", "fid_shapes", "adherence", "seconds"]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in dict.fromkeys(r["guider"] for r in rows):
        mine = [r for r in rows if r["guider"] == name]
        scales = [r["scale"] for r in mine]
        if name == "cfgpp":
            axes[2].plot(scales, [r["adherence"] for r in mine], "v-", label="adherence")
            twin = axes[2].twinx()
            twin.plot(scales, [r["fid_shapes"] for r in mine], "v--", color="C3", label="fid_shapes")
            twin.set_ylabel("fid_shapes (dashed)")
            axes[2].set(xlabel="CFG++ lambda", ylabel="adherence (solid)", title="cfgpp")
            continue
        axes[0].plot(scales, [r["adherence"] for r in mine], STYLE.get(name, "o-"), label=name)
        axes[1].plot(scales, [r["fid_shapes"] for r in mine], STYLE.get(name, "o-"), label=name)
    axes[0].set(xlabel="guidance scale w", ylabel="caption adherence", title=f"adherence (DDIM-{args.steps}, N={args.n})")
    axes[1].set(xlabel="guidance scale w", ylabel="fid_shapes (lower = closer to data)", title="fid_shapes")
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
