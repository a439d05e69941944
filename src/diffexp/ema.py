"""Post-hoc EMA (Karras et al. 2024, EDM2): any EMA length reconstructed after training from the snapshots a run
with ``callbacks.ema.posthoc=true`` wrote (:mod:`diffexp.posthoc` has the mathematics).

    python -m diffexp.ema RUN --sigma-rel 0.05 0.1 --out DIR      # DIR/sigma_rel_0.05/model.safetensors, ...

Each output is a normal weights file (the run's config, its other state, the reconstructed parameters) that
``sample.py ckpt=`` and :func:`diffexp.api.load_model` read.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from diffexp.callbacks.ema import SNAPSHOT_DIR, profile_prefix
from diffexp.posthoc import MAX_SIGMA_REL, combine, posthoc_coefficients, profile_inner, sigma_rel_to_gamma


def read_snapshots(directory: Path) -> list[tuple[int, float, float, dict[str, torch.Tensor]]]:
    """[(step, sigma_rel, gamma, tensors)] of every profile in every snapshot file of ``directory``, by step."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("step_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no EMA snapshots in {directory}: train with callbacks.ema.posthoc=true (snapshots "
                                f"every callbacks.ema.snapshot_every steps)")
    out = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step = int(meta["step"])
        for sigma_rel in json.loads(meta["sigma_rels"]):
            prefix = profile_prefix(sigma_rel)
            out.append((step, sigma_rel, sigma_rel_to_gamma(sigma_rel),
                        {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
    return out


def reconstruct(directory: Path, sigma_rel: float, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot's) from the snapshots in
    ``directory``; with a report (coefficients, snapshots used, the profile fit's relative residual)."""
    snapshots = read_snapshots(directory)
    steps_there = sorted({s[0] for s in snapshots})
    step = steps_there[-1] if step is None else int(step)
    if step not in steps_there:  # EDM2 reconstructs at snapshot times: elsewhere the fit has nothing near the end
        shown = steps_there if len(steps_there) <= 12 else steps_there[:3] + ["..."] + steps_there[-3:]
        raise ValueError(f"--step {step}: reconstructions are made at a snapshot's step; this run has snapshots at "
                         f"steps {shown}")
    used = [s for s in snapshots if s[0] <= step]
    gamma = sigma_rel_to_gamma(sigma_rel)
    steps, gammas = [s[0] for s in used], [s[2] for s in used]
    x = posthoc_coefficients(steps, gammas, step, gamma)
    A = profile_inner(np.array(steps)[:, None], np.array(gammas)[:, None], np.array(steps)[None], np.array(gammas)[None])
    b = profile_inner(np.array(steps), np.array(gammas), step, gamma)
    target = profile_inner(step, gamma, step, gamma)
    residual = math.sqrt(max(float(x @ A @ x - 2 * x @ b + target), 0.0) / float(target))
    report = {"sigma_rel": sigma_rel, "gamma": gamma, "step": step, "snapshots": len(used),
              "coefficient_sum": float(np.sum(x)), "relative_residual": residual}
    if residual > 0.1:
        warnings.warn(f"sigma_rel={sigma_rel} at step {step}: the snapshots' profiles fit the target's only to a "
                      f"relative residual of {residual:.2f}; the result is far from that EMA (keep more snapshots: "
                      f"callbacks.ema.snapshot_every)", stacklevel=2)
    return combine([s[3] for s in used], x), report


def main(argv: list[str] | None = None) -> None:
    from diffexp.checkpoints import CONFIG_KEY, read_checkpoint, save_weights
    from diffexp.config import reported_errors

    parser = argparse.ArgumentParser(prog="python -m diffexp.ema", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory trained with callbacks.ema.posthoc=true")
    parser.add_argument("--sigma-rel", type=float, nargs="+", required=True,
                        help=f"EMA lengths to reconstruct, each in (0, {MAX_SIGMA_REL:.4f}]")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/sigma_rel_<value>/model.safetensors")
    parser.add_argument("--step", type=int, default=None, help="the training step (default: the last snapshot's)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already at --out")
    args = parser.parse_args(argv)
    with reported_errors():
        for value in args.sigma_rel:
            sigma_rel_to_gamma(value)  # every value checked before any work
        directory = args.run / SNAPSHOT_DIR
        if not args.run.is_dir():
            raise FileNotFoundError(f"RUN {str(args.run)!r} is not a run directory")
        targets = {v: args.out / f"sigma_rel_{v:g}" / "model.safetensors" for v in args.sigma_rel}
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not args.overwrite:
            raise FileExistsError(f"--out already holds {existing}; choose another --out or add --overwrite")
        base_file = next((p for p in (args.run / "checkpoints" / "last.ckpt",
                                      args.run / "checkpoints" / "model.safetensors") if p.is_file()), None)
        if base_file is None:
            raise FileNotFoundError(f"{args.run} has no checkpoints/last.ckpt or model.safetensors to take the "
                                    f"config and the untracked state (buffers) from")
        base = read_checkpoint(base_file)
        for sigma_rel, target in targets.items():
            weights, report = reconstruct(directory, sigma_rel, args.step)
            state = dict(base["state_dict"])
            unknown = sorted(set(weights) - set(state))
            if unknown:
                raise ValueError(f"the snapshots hold tensors the run's model does not ({unknown[:3]})")
            state.update(weights)
            save_weights(state, base[CONFIG_KEY], target)
            print(json.dumps({**report, "out": str(target)}))


if __name__ == "__main__":
    main()
