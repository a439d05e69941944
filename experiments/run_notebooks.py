"""Execute the course notebooks from their jupytext sources and write the .ipynb with outputs.

    python experiments/run_notebooks.py                 # all, course settings, .ipynb beside the sources
    python experiments/run_notebooks.py --mode ci 03    # quick settings (what CI runs), notebooks matching "03"
    python experiments/run_notebooks.py --mode ci --out /tmp/nb

Notebooks train their own small checkpoints under ``$DIFFEXP_NOTEBOOK_RUNS`` (default
experiments/runs/, ignored by git) and write figures to ``$DIFFEXP_FIGURES`` (default
experiments/figures/). Any cell error fails the run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sources(patterns: list[str]) -> list[Path]:
    found = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
    if patterns:
        found = [p for p in found if any(pat in p.stem for pat in patterns)]
    return found


def execute(source: Path, out_dir: Path, mode: str, timeout: int = 1800) -> Path:
    """Run ``source`` (jupytext percent format) top to bottom in a fresh kernel; write ``out_dir/<name>.ipynb``."""
    import jupytext
    from nbclient import NotebookClient

    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    os.environ["DIFFEXP_NOTEBOOK_MODE"] = mode
    os.environ.setdefault("DIFFEXP_NOTEBOOK_RUNS", str(HERE / "runs"))
    os.environ.setdefault("DIFFEXP_FIGURES", str(HERE / "figures"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    client.execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{source.stem}.ipynb"
    jupytext.write(notebook, target, fmt="ipynb")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="*", help="run only notebooks whose name contains one of these")
    parser.add_argument("--mode", choices=["course", "ci"], default="course")
    parser.add_argument("--out", default=str(HERE), help="where the executed .ipynb files go")
    args = parser.parse_args()
    todo = sources(args.patterns)
    if not todo:
        sys.exit(f"no notebook matches {args.patterns}; available: {[p.stem for p in sources([])]}")
    for source in todo:
        start = time.perf_counter()
        target = execute(source, Path(args.out), args.mode)
        print(f"{source.name}: {time.perf_counter() - start:.0f} s -> {target}")


if __name__ == "__main__":
    main()
