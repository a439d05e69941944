"""Compare the jobs of a sweep without W&B: ``python -m diffexp.compare MULTIRUN_DIR [--out DIR]``.

Reads every job directory under MULTIRUN_DIR (``.hydra/overrides.yaml``, ``csv/metrics.csv``,
``error.txt`` if the job failed) and writes to ``--out`` (default: MULTIRUN_DIR/compare):

* ``compare.md`` and ``compare.csv``: one row per job — its overrides, status and the last logged
  value of each metric (``train/loss`` as the mean of the last 10% of steps, to tame its noise);
* ``loss_curves.png``: train/loss (smoothed) and val/loss of every job;
* ``metrics_by_option.png``: each final metric against each varied option.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import yaml


def read_metrics(job_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The CSV logger's metrics of a job (``job_dir/csv/metrics.csv``, or ``job_dir/metrics.csv`` as a shipped
    course model keeps them): name -> [(step, value), ...] (empty if it logged none)."""
    path = job_dir / "csv" / "metrics.csv"
    if not path.is_file():
        path = job_dir / "metrics.csv"
    columns: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return columns
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    columns.setdefault(key, []).append((int(row["step"]), float(value)))
    return columns


def final_value(name: str, series: list[tuple[int, float]]) -> float:
    if name == "train/loss":
        tail = series[-max(1, len(series) // 10):]
        return sum(v for _, v in tail) / len(tail)
    return series[-1][1]


def parse_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def read_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per job directory (those holding .hydra/overrides.yaml), in job-number order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{str(sweep_dir)!r} is not a directory; pass a multirun directory "
                                f"(e.g. logs/train/multiruns/<time>)")
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"),
                                 key=lambda p: (not p.parent.parent.name.isdigit(),
                                                int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
                                                p.parent.parent.name)):
        job_dir = overrides_file.parent.parent
        overrides = dict(parse_override(o) for o in (yaml.safe_load(overrides_file.read_text()) or []))
        metrics = read_metrics(job_dir)
        jobs.append({"job": job_dir.name, "dir": job_dir, "overrides": overrides, "series": metrics,
                     "final": {k: final_value(k, v) for k, v in metrics.items() if v},
                     "status": "failed" if (job_dir / "error.txt").is_file() else ("ok" if metrics else "no metrics")})
    if not jobs:
        raise FileNotFoundError(f"no job directories (*/.hydra/overrides.yaml) under {str(sweep_dir)!r}")
    return jobs


def varied_options(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (or that only some jobs set)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j["overrides"]))
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def metric_columns(jobs: list[dict]) -> list[str]:
    names = sorted({k for j in jobs for k in j["final"]})
    preferred = [n for n in names if n.startswith("val/")] + [n for n in names if n == "train/loss"]
    return preferred + [n for n in names if n not in preferred and not n.startswith(("lr-", "time/", "fid/"))]


def fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def write_tables(jobs: list[dict], out: Path) -> tuple[Path, Path]:
    options, metrics = varied_options(jobs), metric_columns(jobs)
    header = ["job", *options, "status", *metrics]
    rows = [[j["job"], *(j["overrides"].get(o, "") for o in options), j["status"],
             *(j["final"].get(m) for m in metrics)] for j in jobs]
    csv_path = out / "compare.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[fmt(v) for v in row] for row in rows])
    md_path = out / "compare.md"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def write_plots(jobs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options = varied_options(jobs)

    def label(job):
        return ", ".join(f"{o}={job['overrides'].get(o, '')}" for o in options) or job["job"]

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for job in jobs:
        for ax, key in zip(axes, ("train/loss", "val/loss")):
            series = job["series"].get(key)
            if not series:
                continue
            steps, values = zip(*series)
            if key == "train/loss" and len(values) > 10:
                k = max(1, len(values) // 20)
                values = [sum(values[max(0, i - k):i + 1]) / len(values[max(0, i - k):i + 1]) for i in range(len(values))]
            ax.plot(steps, values, label=label(job), marker="o" if key == "val/loss" else None, ms=3)
    for ax, key in zip(axes, ("train/loss (smoothed)", "val/loss")):
        ax.set_title(key), ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    metrics = metric_columns(jobs)
    if options and metrics:
        fig, axes = plt.subplots(len(metrics), len(options), figsize=(4 * len(options), 2.8 * len(metrics)),
                                 squeeze=False)
        for r, metric in enumerate(metrics):
            for c, option in enumerate(options):
                ax = axes[r, c]
                values = [j["overrides"].get(option, "") for j in jobs]
                ys = [j["final"].get(metric, float("nan")) for j in jobs]
                categories = list(dict.fromkeys(values))
                ax.scatter([categories.index(v) for v in values], ys)
                ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
                ax.set_xlabel(option, fontsize=8), ax.set_ylabel(metric, fontsize=8)
        fig.tight_layout()
        paths.append(out / "metrics_by_option.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def compare(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write tables and plots for a multirun directory; returns {"jobs", "markdown", "csv", "plots"}."""
    jobs = read_jobs(Path(sweep_dir))
    out = Path(out) if out is not None else Path(sweep_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = write_tables(jobs, out)
    return {"jobs": jobs, "markdown": md_path, "csv": csv_path, "plots": write_plots(jobs, out)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffexp.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. logs/train/multiruns/<time>")
    parser.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR/compare)")
    args = parser.parse_args(argv)
    try:
        result = compare(args.sweep_dir, args.out)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(result["markdown"].read_text())
    print(f"wrote {result['markdown']}, {result['csv']}, " + ", ".join(str(p) for p in result["plots"]))


if __name__ == "__main__":
    main(sys.argv[1:])
