"""fid_digits of checkpoints x samplers over several sampling seeds: mean, std and each seed's value.

    python experiments/scripts/seed_spread.py --ckpt ddpm=RUN_A/checkpoints/model.safetensors \
        --ckpt flow=RUN_B/checkpoints/model.safetensors --samplers unipc:10:trailing unipc:10 dpmpp_2m:20 \
        --seeds 0 1 2 3 4 --n 1000 --out experiments/results/formulations/seeds
    (default --out logs/seed_spread/seeds; existing tables are replaced only with --overwrite)

FID on 1,000 samples moves by a few hundredths between seeds of x_T (README, "One design space"), so differences of
that size between two models say nothing without the spread. Samplers as in ``evaluate_samplers.py``
(``name:steps[:spacing]``); a checkpoint a spec does not fit is skipped (e.g. Karras spacing on a flow path).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_samplers import parse_sampler  # noqa: E402

from diffexp.api import draw_samples, load_model  # noqa: E402
from diffexp.config import data_of_run, reported_errors  # noqa: E402
from diffexp.metrics import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", action="append", required=True, help="NAME=PATH, repeatable")
    parser.add_argument("--samplers", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", default="logs/seed_spread/seeds", help="writes OUT.json and OUT.md")
    parser.add_argument("--overwrite", action="store_true", help="replace the tables at --out")
    args = parser.parse_args()
    with reported_errors():
        run(args)


def run(args) -> None:
    if Path(args.out).with_suffix(".json").exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out!r} already holds results; replace them with --overwrite or choose "
                              f"another --out")
    checkpoints = {}
    for item in args.ckpt:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"--ckpt {item!r}: pass NAME=PATH with an existing checkpoint file")
        checkpoints[name] = path
    rows = []
    for name, path in checkpoints.items():
        model, cfg = load_model(path)
        datamodule = data_of_run(cfg)
        for spec in args.samplers:
            label, factory = parse_sampler(spec)
            try:
                sampler = model.make_sampler(factory)
            except ValueError as error:
                print(f"[skip] {name} {spec}: {error}", flush=True)
                continue
            values = []
            for seed in args.seeds:
                images = draw_samples(model, args.n, sampler, seed, args.n, progress=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    values.append(round(evaluate(["fid_digits"], images, datamodule)["fid_digits"]["value"], 4))
            row = {"model": name, "sampler": label, "spacing": sampler.timestep_spacing, "nfe": sampler.nfe(),
                   "n": args.n, "seeds": args.seeds, "fid_digits": values, "mean": round(statistics.mean(values), 4),
                   "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["| model | sampler (spacing) | NFE | fid_digits mean ± std | per seed |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sampler']} ({r['spacing']}) | {r['nfe']} | {r['mean']:.3f} ± {r['std']:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in r['fid_digits'])} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
