"""Evaluate one checkpoint with several samplers on domain features; write a JSON + markdown table (+ a plot).

    python experiments/scripts/evaluate_samplers.py --ckpt logs/train/latest/checkpoints/last.ckpt --n 1000
    python experiments/scripts/evaluate_samplers.py --ckpt ... --n 1000 --nfe 5 8 10 15 20 50 \
        --solvers ddim dpmpp_2m dpmpp_3m dpmpp_2m_sde unipc euler heun euler_ancestral --references

Rows: ``--samplers`` (``ddim:50`` = DDIM with 50 steps; default DDPM-1000, DDIM-50/20/10), or with ``--nfe`` every
solver of ``--solvers`` at each number of model evaluations (:func:`steps_for`: Heun and EDM's sampler spend 2 per
step, 1 on the last and 1 on a first step from infinite noise, so on a DDPM path NFE = 2 steps - 1 = 5, 7, 11, 15, 19,
51 for the grid 5 8 10 15 20 50 and on a flow path, whose t = 1 is pure noise, 2 steps - 2), plus with
``--references`` DDIM-1000 (eta = 0, the probability-flow ODE's converged result) and DDPM-1000 (ancestral), or the
reference rows given. Tables are rewritten after every row; ``--resume`` adds only the rows missing from ``--out``.
Every row starts from the same noise x_T (one batch of N drawn from ``--seed``; with a smaller ``--batch-size`` the
stochastic samplers' draws shift later batches' x_T) and reports sampling wall time and
the NFE; with ``--nfe`` a plot of the first metric against NFE (log x) is written next to the table.

Text-conditioned models sample the run's validation captions (cycled to N) with classifier-free guidance
``--guidance``; on shapes each row also gets caption adherence (:func:`diffexp.metrics.adherence.caption_adherence`):

    python experiments/scripts/evaluate_samplers.py --ckpt RUN/checkpoints/last.ckpt --n 500 --nfe 5 10 20 50 \
        --solvers ddim dpmpp_2m unipc --guidance 3 --metrics fid_shapes --out experiments/results/shapes_solvers
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial
from pathlib import Path

from diffexp.config import data_of_run, reported_errors
from diffexp.metrics import check_metric_names, evaluate
from diffexp.metrics.adherence import caption_adherence
from diffexp.samplers import SAMPLERS
from diffexp.api import draw_samples, load_model

ROOT = Path(__file__).resolve().parents[2]


def parse_sampler(spec: str):
    """``ddpm``, ``ddim:50`` or ``dpmpp_2m:10:trailing`` (a timestep spacing) -> (label, partial sampler)."""
    name, _, rest = spec.partition(":")
    steps, _, spacing = rest.partition(":")
    if name not in SAMPLERS:
        raise ValueError(f"sampler spec {spec!r}: the sampler must be one of {sorted(SAMPLERS)}")
    if steps and not (steps.isdigit() and int(steps) > 0):
        raise ValueError(f"sampler spec {spec!r}: the steps after the first ':' must be a positive integer")
    kwargs = {"progress": False}
    if steps:
        kwargs["steps"] = int(steps)
    if spacing:
        kwargs["timestep_spacing"] = spacing
    return f"{name.upper()}-{steps or 'all'}" + (f"-{spacing}" if spacing else ""), partial(SAMPLERS[name], **kwargs)


def steps_for(model, name: str, spacing: str, nfe: int) -> int:
    """The sampler steps whose model evaluations (the built sampler's :meth:`~diffexp.samplers.Sampler.nfe` on this
    model's path) are nearest ``nfe``; of two equally near, the steps round((NFE + 1) / 2) gives (Python's round:
    halves to even). One evaluation per step for all but Heun-type samplers."""
    from diffexp.samplers import HeunSampler

    if not issubclass(SAMPLERS[name], HeunSampler):
        return nfe
    options = {"timestep_spacing": spacing} if spacing else {}
    spent = {steps: model.make_sampler(partial(SAMPLERS[name], steps=steps, progress=False, **options)).nfe()
             for steps in range(2, nfe + 3)}
    nearest = min(abs(n - nfe) for n in spent.values())
    tied = [steps for steps, n in spent.items() if abs(n - nfe) == nearest]
    formula = max(2, round((nfe + 1) / 2))
    return formula if formula in tied else tied[0]


REFERENCES = ["ddim:1000", "ddpm:1000"]


def conditions_for(model, datamodule, n: int) -> dict | None:
    """The conditions of N samples: for a text model the run's validation captions cycled to N, else none."""
    if "captions" not in model.conditioner.keys:
        return None
    captions = datamodule.captions("val")
    return {"captions": [captions[i % len(captions)] for i in range(n)]}


def grid_specs(model, solvers: list[str], nfes: list[int]) -> list[str]:
    """``name`` or ``name:spacing`` per solver, at the steps of each NFE on ``model``'s path."""
    specs = []
    for solver in solvers:  # names checked by run() before the model loads
        name, _, spacing = solver.partition(":")
        specs += [f"{name}:{steps_for(model, name, spacing, nfe)}" + (f":{spacing}" if spacing else "") for nfe in nfes]
    return list(dict.fromkeys(specs))  # two NFEs may round to the same steps


def write_tables(rows: list[dict], out: Path, header: dict) -> None:
    """``out``.json and ``out``.md (rewritten after every row, so a stopped run keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], metric: str, path: Path) -> None:
    """``metric`` against NFE (log x), one line per sampler; the 1000-step references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_name: dict[str, list] = {}
    styles = iter([("k", "--"), ("tab:gray", "--"), ("k", ":"), ("tab:gray", ":")])
    for row in rows:
        if row.get("reference"):
            color, ls = next(styles)
            ax.axhline(row[metric], ls=ls, lw=1, color=color, label=f"{row['sampler']} (reference)")
        else:
            by_name.setdefault(row["name"], []).append((row["nfe"], row[metric]))
    for name, points in by_name.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="logs/train/latest/checkpoints/last.ckpt")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="default N: one batch, the same x_T for every row")
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim:50", "ddim:20", "ddim:10"])
    parser.add_argument("--nfe", nargs="+", type=int, help="an NFE grid: every --solvers entry at each NFE")
    parser.add_argument("--solvers", nargs="+", default=["ddim", "dpmpp_2m", "unipc"],
                        help="samplers of the --nfe grid, each optionally with a spacing: unipc:trailing")
    parser.add_argument("--references", nargs="*", default=None,
                        help="reference rows (plotted as lines): alone DDIM-1000 and DDPM-1000, or specs such as ddim:1000")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and add the missing ones")
    parser.add_argument("--metrics", nargs="+", default=["fid_digits", "kid_digits", "digits_classifier"])
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale for conditional models (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "quickstart_samplers"))
    parser.add_argument("--overwrite", action="store_true", help="replace the tables at --out")
    args = parser.parse_args()
    with reported_errors():
        run(args)


def run(args) -> None:
    """Check every option before loading anything, then sample and score row by row."""
    if args.n <= 0 or (args.batch_size is not None and args.batch_size <= 0):
        raise ValueError(f"--n and --batch-size must be positive, got {args.n} and {args.batch_size}")
    if args.nfe and min(args.nfe) <= 0:
        raise ValueError(f"--nfe values must be positive, got {args.nfe}")
    check_metric_names(args.metrics)
    for solver in args.solvers if args.nfe else []:
        if solver.partition(":")[0] not in SAMPLERS:
            raise ValueError(f"--solvers {solver!r}: the sampler must be one of {sorted(SAMPLERS)}")
    references = (args.references or REFERENCES) if args.references is not None else []
    out = Path(args.out)
    if out.with_suffix(".json").exists() and not (args.resume or args.overwrite):
        raise FileExistsError(f"--out {str(out)!r} already holds results ({out.with_suffix('.json').name}); add rows "
                              f"to it with --resume, replace it with --overwrite, or choose another --out")
    model, train_cfg = load_model(args.ckpt, device=args.device)
    specs = grid_specs(model, args.solvers, args.nfe) if args.nfe else list(args.samplers)
    for spec in specs + references:  # every spec builds (spacing, steps) before any sampling
        model.make_sampler(parse_sampler(spec)[1])
    header = {"ckpt": args.ckpt, "seed": args.seed, "guidance_scale": args.guidance}
    datamodule = data_of_run(train_cfg)
    conditions = conditions_for(model, datamodule, args.n)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if args.resume and out.with_suffix(".json").is_file() else []
    done = {r["sampler"] for r in rows}
    for spec in specs + references:
        label, sampler = parse_sampler(spec)
        if label in done:
            continue
        start = time.perf_counter()
        images = draw_samples(model, args.n, sampler, args.seed, args.batch_size or args.n, conditions=conditions,
                              progress=False, guidance_scale=args.guidance)
        seconds = time.perf_counter() - start
        built = model.make_sampler(sampler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = evaluate(args.metrics, images, datamodule)
        name = spec.partition(":")[0] + (f" ({built.timestep_spacing})" if spec.count(":") > 1 else "")
        row = {"sampler": label, "name": name, "steps": len(built.timesteps), "nfe": built.nfe(),
               "spacing": getattr(built, "timestep_spacing", None), "n": args.n, "sampling_seconds": round(seconds, 1),
               "images_per_second": round(args.n / seconds, 1), "reference": spec in references}
        for name, value in metrics.items():
            if "value" in value:
                row[name] = round(value["value"], 4)
            else:
                row[f"{name}_confident"] = value["confident_fraction"]
                row[f"{name}_classes"] = value["classes_present"]
        if conditions and datamodule.name == "shapes":
            row["adherence"] = caption_adherence(images, conditions["captions"])["adherence"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_tables(rows, out, header)
    write_tables(rows, out, header)  # also when every row was there already
    print(out.with_suffix(".md").read_text())
    if args.nfe:
        plot(rows, args.metrics[0], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
