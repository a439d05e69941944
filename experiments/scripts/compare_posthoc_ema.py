"""Post-hoc EMA on one run: fid_digits of the weights reconstructed for each EMA length sigma_rel, beside the run's
fixed-decay EMA and its raw weights.

    python train.py callbacks.ema.posthoc=true callbacks.ema.snapshot_every=50 hydra.run.dir=logs/posthoc
    python experiments/scripts/compare_posthoc_ema.py --run logs/posthoc --n 1000 \\
        --sigma-rel 0.01 0.02 0.03 0.05 0.07 0.1 0.15 0.2 --out experiments/results/posthoc_ema/digits

Every row samples N images from the same x_T with DPM-Solver++(2M), 20 steps. Reconstructions come from
:func:`diffexp.ema.reconstruct` (the run's snapshots up to the last step), loaded into the run's model as
``python -m diffexp.ema`` would write them. Writes OUT.{json,md,png}.
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

from diffexp.api import draw_samples, load_model  # noqa: E402
from diffexp.callbacks.ema import SNAPSHOT_DIR  # noqa: E402
from diffexp.config import data_of_run, reported_errors  # noqa: E402
from diffexp.ema import reconstruct  # noqa: E402
from diffexp.metrics import evaluate  # noqa: E402
from diffexp.posthoc import sigma_rel_to_gamma  # noqa: E402
from diffexp.samplers import DPMSolver2M  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run trained with callbacks.ema.posthoc=true")
    parser.add_argument("--sigma-rel", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "posthoc_ema" / "digits"))
    args = parser.parse_args()
    with reported_errors():
        run(args)


def score(model, datamodule, args) -> float:
    images = draw_samples(model, args.n, partial(DPMSolver2M, steps=args.steps, progress=False), args.seed, args.n,
                          progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return round(evaluate(["fid_digits"], images, datamodule)["fid_digits"]["value"], 4)


def run(args) -> None:
    for value in args.sigma_rel:
        sigma_rel_to_gamma(value)
    ckpt = args.run / "checkpoints" / "last.ckpt"
    model, cfg = load_model(ckpt)
    datamodule = data_of_run(cfg)
    decay = cfg.callbacks.ema.decay
    rows = [{"weights": f"fixed-decay EMA {decay}", "sigma_rel": None, "fid_digits": score(model, datamodule, args)}]
    raw, _ = load_model(ckpt, use_ema=False)
    rows.append({"weights": "raw (no EMA)", "sigma_rel": None, "fid_digits": score(raw, datamodule, args)})
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for sigma_rel in args.sigma_rel:
        weights, report = reconstruct(args.run / SNAPSHOT_DIR, sigma_rel)
        model.load_state_dict({**base, **weights})
        rows.append({"weights": f"post-hoc sigma_rel {sigma_rel:g}", "sigma_rel": sigma_rel,
                     "fid_digits": score(model, datamodule, args), "snapshots": report["snapshots"],
                     "relative_residual": round(report["relative_residual"], 4), "step": report["step"]})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"run": str(args.run), "n": args.n, "seed": args.seed,
                                                    "sampler": f"dpmpp_2m:{args.steps}", "rows": rows}, indent=2))
    table = ["| weights | fid_digits | profile fit residual |", "|---|---|---|"]
    table += [f"| {r['weights']} | {r['fid_digits']:.3f} | {r.get('relative_residual', '')} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    posthoc = [r for r in rows if r["sigma_rel"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["sigma_rel"] for r in posthoc], [r["fid_digits"] for r in posthoc], "o-", label="post-hoc EMA")
    ax.axhline(rows[0]["fid_digits"], color="C1", ls="--", label=rows[0]["weights"])
    ax.axhline(rows[1]["fid_digits"], color="C2", ls=":", label=rows[1]["weights"])
    ax.set(xscale="log", xlabel="sigma_rel (EMA length relative to training time)", ylabel="fid_digits",
           title=f"one run, EMA length chosen after training (N={args.n})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(table))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
