"""Few-step students against their teacher: fid_digits and the digits classifier's confident fraction at 1, 2, 4 and
8 model evaluations (NFE) per distillation method, beside the teacher at 20 NFE and its converged ODE.

    python train.py                                                             # the teacher (quickstart)
    python train.py distill=consistency init_from=TEACHER                       # and progressive, reflow
    python experiments/scripts/compare_distillation.py --teacher TEACHER --consistency RUN_C --progressive RUN_P \\
        --reflow RUN_R --n 1000 --levels 0.6 0.4 --out experiments/results/distill

Each RUN is a run directory (its ``checkpoints/model.safetensors``: EMA weights; progressive: its per-round
``progressive_<N>steps.safetensors``). Every row comes from ``evaluate_samplers.py`` with the same ``--seed``, so
every sampler starts from the same x_T: the teacher with DPM-Solver++(2M) at ``--teacher-nfe`` and 100 steps (its
converged ODE), consistency students with the consistency sampler, progressive students with DDIM on the trailing
grid they were distilled on (one student per NFE), reflow students with Euler. Writes ``OUT/distill.{json,md,png}``
(per-checkpoint tables in ``OUT/rows/``; rows already there are kept) with the distillations' wall times as given
(``--wall consistency=SECONDS ...``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOALS = {4: 1.1, 2: 1.3, 1: 2.0}  # students' fid_digits within this factor of the teacher's at 20 NFE


def evaluate(ckpt: Path, samplers: list[str], out: Path, args, references: list[str] | None = None) -> list[dict]:
    command = [sys.executable, str(ROOT / "experiments" / "scripts" / "evaluate_samplers.py"), "--ckpt", str(ckpt),
               "--n", str(args.n), "--seed", str(args.seed), "--samplers", *samplers,
               "--metrics", "fid_digits", "digits_classifier", "--out", str(out), "--resume"]
    if references:
        command += ["--references", *references]  # (--references alone means DDIM-1000 and DDPM-1000)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.with_suffix(".json").read_text())["rows"]


def flow_levels(steps: int, hi: float, lo: float) -> list[float]:
    """The ``steps`` - 1 levels after the first, evenly spaced in flow time from ``hi`` to ``lo`` (one: ``hi``)."""
    if steps == 2:
        return [hi]
    return [hi + (lo - hi) * i / (steps - 2) for i in range(steps - 1)]


def evaluate_levels(ckpt: Path, nfes: list[int], hi: float, lo: float, out: Path, args) -> list[dict]:
    """Consistency sampling with :func:`flow_levels` (as ``sampler.sigmas``), the same x_T as the other rows."""
    from functools import partial

    from diffexp.api import draw_samples, load_model
    from diffexp.config import data_of_run
    from diffexp.metrics import evaluate as score
    from diffexp.samplers import ConsistencySampler

    model, cfg = load_model(ckpt)
    datamodule = data_of_run(cfg)
    rows = []
    for n in nfes:
        if n < 2:
            continue
        sigmas = [model.path.ve_sigma(t) for t in flow_levels(n, hi, lo)]
        sampler = partial(ConsistencySampler, steps=n, sigmas=sigmas, progress=False)
        images = draw_samples(model, args.n, sampler, args.seed, args.n, progress=False)
        metrics = score(["fid_digits", "digits_classifier"], images, datamodule)
        rows.append({"sampler": f"CONSISTENCY-{n}", "sigmas": [round(s, 4) for s in sigmas], "nfe": n,
                     "fid_digits": round(metrics["fid_digits"]["value"], 4),
                     "digits_classifier_confident": metrics["digits_classifier"]["confident_fraction"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"ckpt": str(ckpt), "levels": [hi, lo], "rows": rows}, indent=2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher's checkpoint")
    parser.add_argument("--consistency", type=Path, nargs="+", help="run directories of distill=consistency (each a row: "
                        "LABEL=DIR or DIR)")
    parser.add_argument("--levels", type=float, nargs=2, metavar=("HI", "LO"),
                        help="also sample the consistency students with their levels after the first evenly spaced "
                             "in flow time from HI to LO (sampler.sigmas)")
    parser.add_argument("--progressive", type=Path, help="run directory of distill=progressive")
    parser.add_argument("--reflow", type=Path, help="run directory of distill=reflow")
    parser.add_argument("--nfe", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--teacher-nfe", type=int, default=20)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wall", nargs="*", default=[], help="METHOD=SECONDS: distillation wall times to report")
    parser.add_argument("--out", type=Path, default=Path("logs/distill_compare"))
    args = parser.parse_args()
    rows_dir = args.out / "rows"
    walls = {k: float(v) for k, v in (item.split("=", 1) for item in args.wall)}

    teacher = evaluate(Path(args.teacher), [f"dpmpp_2m:{args.teacher_nfe}"], rows_dir / "teacher", args,
                       references=["dpmpp_2m:100"])
    reference = next(r for r in teacher if not r["reference"])
    converged = next(r for r in teacher if r["reference"])
    table = {"teacher": args.teacher, "n": args.n, "seed": args.seed,
             "teacher_20": {k: reference[k] for k in ("sampler", "nfe", "fid_digits", "digits_classifier_confident")},
             "teacher_converged": {k: converged[k] for k in ("sampler", "nfe", "fid_digits",
                                                               "digits_classifier_confident")},
             "methods": {}}
    for spec in args.consistency or []:
        label, _, folder = str(spec).rpartition("=")
        label = label or "consistency"
        ckpt = Path(folder) / "checkpoints" / "model.safetensors"
        table["methods"][label] = evaluate(ckpt, [f"consistency:{n}" for n in args.nfe], rows_dir / label, args)
        if args.levels:
            table["methods"][f"{label}, levels {args.levels[0]:g} -> {args.levels[1]:g}"] = \
                evaluate_levels(ckpt, args.nfe, *args.levels, rows_dir / f"{label}_levels", args)
    if args.progressive:
        rows = []
        for n in args.nfe:
            ckpt = args.progressive / "checkpoints" / f"progressive_{n}steps.safetensors"
            if ckpt.is_file():
                rows += evaluate(ckpt, [f"ddim:{n}:trailing"], rows_dir / f"progressive_{n}", args)
        table["methods"]["progressive"] = rows
    if args.reflow:
        rows = evaluate(args.reflow / "checkpoints" / "model.safetensors", [f"euler:{n}" for n in args.nfe],
                        rows_dir / "reflow", args)
        table["methods"]["reflow"] = rows
    table["wall_seconds"] = walls
    write(table, args)


def write(table: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(table, indent=2))
    base = table["teacher_20"]["fid_digits"]
    head = "| method | wall time | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |"
    lines = [f"fid_digits / confident share (N = {table['n']}, same x_T); teacher: DPM-Solver++(2M)-"
             f"{table['teacher_20']['nfe']} {base:.3f} / {100 * table['teacher_20']['digits_classifier_confident']:.1f} %, "
             f"converged ODE (DPM-Solver++(2M)-100) {table['teacher_converged']['fid_digits']:.3f} / "
             f"{100 * table['teacher_converged']['digits_classifier_confident']:.1f} %", "",
             head, "|---|---|" + "---|" * len(args.nfe)]
    for method, rows in table["methods"].items():
        by_nfe = {r["nfe"]: r for r in rows}
        wall = table["wall_seconds"].get(method)
        cells = []
        for n in args.nfe:
            r = by_nfe.get(n)
            if r is None:
                cells.append("")
                continue
            ratio = r["fid_digits"] / base
            goal = GOALS.get(n)
            mark = "" if goal is None else (" ✓" if ratio <= goal else " ✗")
            cells.append(f"{r['fid_digits']:.3f} / {100 * r['digits_classifier_confident']:.1f} % "
                         f"(x{ratio:.2f}{mark})")
        lines.append(f"| {method} | {'' if wall is None else f'{wall / 60:.1f} min'} | " + " | ".join(cells) + " |")
    lines += ["", "x: fid_digits over the teacher's at 20 NFE; goals x1.1 at 4 NFE, x1.3 at 2, x2 at 1 (✓ met, ✗ not)."]
    (args.out / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, args)


def plot(table: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, rows in table["methods"].items():
        points = sorted((r["nfe"], r["fid_digits"]) for r in rows)
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(table["teacher_20"]["fid_digits"], color="k", ls="--", lw=1,
               label=f"teacher, {table['teacher_20']['nfe']} NFE")
    ax.axhline(table["teacher_converged"]["fid_digits"], color="gray", ls=":", lw=1, label="teacher, converged ODE")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(args.nfe, [str(n) for n in args.nfe])
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("fid_digits (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(args.out / "distill.png", dpi=120)


if __name__ == "__main__":
    main()
