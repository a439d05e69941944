"""What a run directory records so the run can be reproduced: git state, package versions, seed."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "lightning", "hydra-core", "omegaconf", "torchmetrics", "torch-fidelity", "lpips",
            "wandb", "transformers", "diffusers", "scikit-learn", "numpy", "diffexp")


def git_state(cwd: str | Path | None = None) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the repository containing ``cwd``."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hydra_overrides() -> list[str] | None:
    """This job's command-line overrides (what distinguishes it within a sweep; under SLURM ``argv`` is
    submitit's), or None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def write_run_info(run_dir: str | Path, seed: int | None, extra: dict | None = None) -> Path:
    """Write RUN/run_info.json: git commit and dirty flag, package versions, python, argv, Hydra overrides, seed."""
    info = {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        "overrides": hydra_overrides(),
        "seed": seed,
        **(extra or {}),
    }
    path = Path(run_dir) / "run_info.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    return path


def update_run_info(run_dir: str | Path, fields: dict) -> Path:
    """Add ``fields`` to RUN/run_info.json (written by :func:`write_run_info` when the run started)."""
    path = Path(run_dir) / "run_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**info, **fields}, indent=2))
    return path
