"""Compare the formulations of one sweep on sample quality against the number of model evaluations (NFE).

    python train.py -m formulation=ddpm,edm,flow,vp                  # the quickstart, once per formulation
    python experiments/scripts/compare_formulations.py --sweep logs/train/multiruns/<time> --n 1000

For every job of the sweep (its formulation read from ``.hydra/overrides.yaml``), ``evaluate_samplers.py`` scores
the formulation's natural samplers (:data:`NATURAL`, at the path's own spacing unless one is named) at each NFE
of ``--nfe`` from the same x_T, plus the probability-flow ODE's converged result (DPM-Solver++(2M) with
``--reference-steps`` steps, default 100); per-job tables land in ``OUT/<formulation>.{json,md,png}`` (``--out``,
default ``SWEEP/formulations``; rows already there are kept, only missing ones are computed), the comparison in
``OUT/formulations.{json,md,png}``: fid_digits and the digits classifier's confident fraction per cell, the best
sampler of each formulation at each NFE, and a plot of fid_digits against NFE, one panel per formulation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NATURAL = {  # the samplers each formulation is sampled with (name or name:spacing)
    "ddpm": ["ddim", "dpmpp_2m", "dpmpp_2m:trailing", "unipc:trailing"],
    "edm": ["edm", "dpmpp_2m", "unipc", "ddim"],
    "flow": ["euler", "heun", "dpmpp_2m", "unipc"],
    "vp": ["ddim", "dpmpp_2m", "unipc", "heun"],
}


def job_formulation(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("formulation=")]
    return chosen[-1] if chosen else "ddpm"


def evaluate_job(job: Path, formulation: str, args) -> Path:
    out = Path(args.out) / formulation
    ckpt = job / "checkpoints" / "model.safetensors"
    command = [sys.executable, str(ROOT / "experiments" / "scripts" / "evaluate_samplers.py"), "--ckpt", str(ckpt),
               "--n", str(args.n), "--nfe", *map(str, args.nfe), "--solvers", *NATURAL.get(formulation, ["ddim"]),
               "--references", f"dpmpp_2m:{args.reference_steps}", "--metrics", "fid_digits", "digits_classifier",
               "--out", str(out), "--resume"]
    subprocess.run(command, check=True)
    return out.with_suffix(".json")


def summarise(results: dict[str, list[dict]], nfes: list[int], out: Path) -> None:
    """The comparison table (markdown, json) and plot."""
    lines = ["| formulation | sampler (spacing) | " + " | ".join(f"NFE {n}" for n in nfes) + " | converged ODE |",
             "|---|---|" + "---|" * (len(nfes) + 1)]
    best = {}
    for formulation, rows in results.items():
        reference = next((r for r in rows if r["reference"]), None)
        ref_cell = f"{reference['fid_digits']:.3f} / {100 * reference['digits_classifier_confident']:.1f} %" if reference else ""
        names = list(dict.fromkeys(r["name"] for r in rows if not r["reference"]))
        for name in names:
            cells = []
            for nfe in nfes:
                row = min((r for r in rows if r["name"] == name and not r["reference"]),
                          key=lambda r: abs(r["nfe"] - nfe))
                cells.append(f"{row['fid_digits']:.3f} / {100 * row['digits_classifier_confident']:.1f} %"
                             + (f" ({row['nfe']})" if row["nfe"] != nfe else ""))
                key = (formulation, nfe)
                if key not in best or row["fid_digits"] < best[key]["fid_digits"]:
                    best[key] = row
            spacing = next(r["spacing"] for r in rows if r["name"] == name)
            lines.append(f"| {formulation} | {name.split(' ')[0]} ({spacing}) | " + " | ".join(cells) + f" | {ref_cell} |")
    lines += ["", "Best per formulation (fid_digits, sampler):", "",
              "| formulation | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for formulation in results:
        lines.append(f"| {formulation} | " + " | ".join(
            f"{best[(formulation, n)]['fid_digits']:.3f} ({best[(formulation, n)]['sampler']}"
            + (f", NFE {best[(formulation, n)]['nfe']}" if best[(formulation, n)]["nfe"] != n else "") + ")"
            for n in nfes) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"nfe": nfes, "results": results}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.4), sharey=True, squeeze=False)
    for ax, (formulation, rows) in zip(axes[0], results.items()):
        for name in dict.fromkeys(r["name"] for r in rows if not r["reference"]):
            points = sorted((r["nfe"], r["fid_digits"]) for r in rows if r["name"] == name and not r["reference"])
            spacing = next(r["spacing"] for r in rows if r["name"] == name)
            ax.plot(*zip(*points), marker="o", ms=3, label=f"{name.split(' ')[0]} ({spacing})")
        for r in rows:
            if r["reference"]:
                ax.axhline(r["fid_digits"], color="k", ls="--", lw=1, label="converged ODE")
        ax.set_title(f"formulation={formulation}", fontsize=10)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fid_digits (N = %d)" % rows[0]["n"])
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="the sweep directory (logs/train/multiruns/<time>)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20, 50])
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="default: SWEEP/formulations (rows already there are kept, "
                        "missing ones added)")
    args = parser.parse_args()
    sweep = Path(args.sweep)
    if not sweep.is_dir():
        sys.exit(f"error: --sweep {args.sweep!r} does not exist (pass logs/train/multiruns/<time> of a train.py -m sweep)")
    args.out = args.out or str(sweep / "formulations")
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not jobs:
        sys.exit(f"error: --sweep {args.sweep!r} holds no job directories (0/, 1/, ...) of a train.py -m sweep")
    results = {}
    for job in jobs:
        formulation = job_formulation(job)
        results[formulation] = json.loads(evaluate_job(job, formulation, args).read_text())["rows"]
    summarise(results, args.nfe, Path(args.out) / "formulations")
    print((Path(args.out) / "formulations.md").read_text())


if __name__ == "__main__":
    main()
