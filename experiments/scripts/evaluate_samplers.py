"""Evaluate one checkpoint with several samplers on domain features; write a JSON + markdown table.

    python experiments/scripts/evaluate_samplers.py --ckpt logs/train/latest/checkpoints/last.ckpt --n 1000

Rows: DDPM-1000, DDIM-50, DDIM-20, DDIM-10 (override with --samplers ddim:50 ...). Every row
draws the same N samples' starting noise (seed), and reports sampling wall time.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial
from pathlib import Path

from diffexp.config import data_of_run
from diffexp.metrics import evaluate
from diffexp.samplers import SAMPLERS
from diffexp.sample import draw_samples, load_model

ROOT = Path(__file__).resolve().parents[2]


def parse_sampler(spec: str):
    """``ddpm`` or ``ddim:50`` -> (label, partial sampler)."""
    name, _, steps = spec.partition(":")
    if name not in SAMPLERS:
        raise ValueError(f"--samplers entry {spec!r}: sampler must be one of {sorted(SAMPLERS)}")
    kwargs = {"progress": False}
    if steps:
        kwargs["steps"] = int(steps)
    return f"{name.upper()}-{steps or 'all'}", partial(SAMPLERS[name], **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="logs/train/latest/checkpoints/last.ckpt")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim:50", "ddim:20", "ddim:10"])
    parser.add_argument("--metrics", nargs="+", default=["fid_digits", "kid_digits", "digits_classifier"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "quickstart_samplers"))
    args = parser.parse_args()

    model, train_cfg = load_model(args.ckpt, device=args.device)
    rows = []
    for spec in args.samplers:
        label, sampler = parse_sampler(spec)
        start = time.perf_counter()
        images = draw_samples(model, args.n, sampler, args.seed, args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = evaluate(args.metrics, images, data_of_run(train_cfg))
        row = {"sampler": label, "n": args.n, "sampling_seconds": round(seconds, 1),
               "images_per_second": round(args.n / seconds, 1)}
        for name, value in metrics.items():
            if "value" in value:
                row[name] = round(value["value"], 4)
            else:
                row[f"{name}_confident"] = value["confident_fraction"]
                row[f"{name}_classes"] = value["classes_present"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"ckpt": args.ckpt, "seed": args.seed, "rows": rows}, indent=2))
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
