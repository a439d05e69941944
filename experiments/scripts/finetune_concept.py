"""Teach a trained shapes text-to-image model a new concept ("star") and measure what each method costs and keeps.

    python experiments/scripts/finetune_concept.py --base RUN/checkpoints/last.ckpt          # shapes_text2img run
    python experiments/scripts/finetune_concept.py --base CKPT --methods full lora:4 lora:16 --steps 300 --n 200

For each method it runs ``python train.py experiment=shapes_star_finetune init_from=BASE ...`` (100 star images;
``lora:R`` adds ``model.lora.rank=R``), timed, then samples the base model and every fine-tuned one on three
prompt sets drawn with fixed seeds:
- new: star captions ("a large red star in the center"): adherence (every attribute read back) and star rate;
- control: the same captions with a nonsense word in place of "star": how often a star appears anyway;
- original: captions of the default data (circle, square, triangle, diamond): adherence afterwards (forgetting).
Writes ``--out``.json and ``--out``.md (trainable parameters, weights file size, wall time). Existing runs in
``--work`` are reused when their settings match (``--retrain`` trains again); existing results are kept unless
``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
NONSENSE = "blicket"


def parse_method(spec: str) -> tuple[str, int]:
    if spec == "full":
        return "full", 0
    if spec.startswith("lora:") and spec[5:].isdigit() and int(spec[5:]) > 0:
        return f"lora_r{int(spec[5:])}", int(spec[5:])
    raise SystemExit(f"error: --methods takes full and lora:RANK (e.g. lora:4), got {spec!r}")


def fine_tune(base: Path, name: str, rank: int, args, work: Path) -> dict:
    """Run train.py for one method (or reuse its finished run); returns where its weights are and its wall time."""
    run_dir = work / name
    weights = run_dir / "checkpoints" / ("adapter.safetensors" if rank else "model.safetensors")
    record = run_dir / "finetune_time.json"
    lr = args.lr_lora if rank else args.lr_full
    settings = {"base": str(base), "steps": args.steps, "lr": lr, "rank": rank, "seed": args.seed}
    if weights.is_file() and record.is_file() and not args.retrain:
        done = json.loads(record.read_text())
        if done.get("settings") == settings:
            return done
        raise SystemExit(f"error: {run_dir} holds a run with other settings ({done.get('settings')}, now {settings}); "
                         f"pass --retrain to replace it or another --work")
    command = [sys.executable, str(ROOT / "train.py"), "experiment=shapes_star_finetune", f"init_from={base}",
               f"trainer.max_steps={args.steps}", f"model.optimizer.lr={lr}", f"hydra.run.dir={run_dir}",
               "trainer.enable_progress_bar=false", f"seed={args.seed}"]
    if rank:
        command += [f"model.lora.rank={rank}", f"model.lora.alpha={rank}"]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, env={**os.environ, "WANDB_MODE": "offline"})
    result = {"command": "python train.py " + " ".join(command[2:]), "seconds": round(time.perf_counter() - start, 1),
              "weights": str(weights), "weights_bytes": weights.stat().st_size, "rank": rank, "lr": lr,
              "settings": settings}
    record.write_text(json.dumps(result, indent=2))
    return result


def prompt_sets(n: int) -> dict[str, list[str]]:
    from diffexp.data.shapes import DEFAULT_HOLDOUT, make_shapes

    new = make_shapes(n, seed=1000, shapes=("star",))[1]
    return {"new": new, "control": [c.replace(" star ", f" {NONSENSE} ") for c in new],
            "original": make_shapes(n, seed=2000, exclude=DEFAULT_HOLDOUT)[1]}


def evaluate(model, prompts: dict[str, list[str]], args) -> dict:
    from diffexp.data.shapes import describe
    from diffexp.metrics.adherence import caption_adherence
    from diffexp.api import draw_samples
    from functools import partial

    from diffexp.samplers import DDIMSampler

    sampler = model.make_sampler(partial(DDIMSampler, steps=args.sampler_steps, progress=False))
    out = {}
    for name, captions in prompts.items():
        images = draw_samples(model, len(captions), sampler, args.seed, 250, {"captions": captions}, progress=False,
                              guidance_scale=args.guidance)
        shapes = [(describe(image) or {}).get("shape") for image in images]
        row = {"star_rate": round(sum(s == "star" for s in shapes) / len(shapes), 4)}
        if name != "control":
            report = caption_adherence(images, captions)
            row.update(adherence=report["adherence"], shape_accuracy=report["shape_accuracy"])
        out[name] = row
    return out


def trainable_parameters(model, rank: int) -> int:
    if rank:
        return sum(v.numel() for k, v in model.adapter_state_dict().items() if torch.is_tensor(v))
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("space.autoencoder."))


def markdown(results: dict) -> str:
    rows = ["| model | trainable params | weights file | fine-tune wall time | star prompts: adherence (star rate) "
            "| control word: star rate | original prompts: adherence |", "|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        size = f"{r['weights_bytes'] / 1024:.0f} KiB" if r.get("weights_bytes") else "—"
        seconds = f"{r['seconds']:.0f} s" if r.get("seconds") else "—"
        params = f"{r['trainable_parameters']:,}" if r.get("trainable_parameters") else "—"
        rows.append(f"| {name} | {params} | {size} | {seconds} | {r['new']['adherence']:.1%} ({r['new']['star_rate']:.1%}) "
                    f"| {r['control']['star_rate']:.1%} | {r['original']['adherence']:.1%} |")
    s = results["settings"]
    rows.append("")
    rows.append(f"N = {s['n']} prompts per set, DDIM-{s['sampler_steps']}, guidance {s['guidance']}, seed {s['seed']}; "
                f"{s['steps']} fine-tuning steps of batch 32 on 100 star images; lr {s['lr_full']} (full), "
                f"{s['lr_lora']} (LoRA); base {s['base']}.")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="checkpoint of an experiment=shapes_text2img run")
    parser.add_argument("--methods", nargs="+", default=["full", "lora:4", "lora:16"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr-full", type=float, default=2e-4)
    parser.add_argument("--lr-lora", type=float, default=2e-3)
    parser.add_argument("--n", type=int, default=200, help="prompts per set")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT / "experiments" / "runs" / "finetune_star"))
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "finetune_star"))
    parser.add_argument("--retrain", action="store_true", help="train again even where --work holds a finished run")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out results")
    args = parser.parse_args(argv)
    from diffexp.finetune import load_adapter
    from diffexp.api import load_model

    base = Path(args.base).resolve()
    if not base.is_file():
        raise SystemExit(f"error: --base {str(base)!r} does not exist; train one with: python train.py "
                         f"experiment=shapes_text2img")
    methods = [parse_method(spec) for spec in args.methods]
    out = Path(args.out)
    if out.with_suffix(".json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out.with_suffix('.json')} exists (published results?); pass --overwrite to "
                         f"replace it or another --out")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = {name: fine_tune(base, name, rank, args, work) for name, rank in methods}
    prompts = prompt_sets(args.n)
    results = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("retrain", "overwrite")},
                            "base": str(base)},
               "prompts_example": {k: v[:3] for k, v in prompts.items()}, "models": {}}
    torch.manual_seed(0)
    for name, rank in [("base", None)] + methods:
        start = time.perf_counter()
        if name == "base":
            model, _ = load_model(base)
        elif rank:
            model, _ = load_model(base)
            load_adapter(model, runs[name]["weights"])
        else:
            model, _ = load_model(runs[name]["weights"])
        model.eval()
        row = {"trainable_parameters": trainable_parameters(model, rank) if rank is not None else None,
               **({k: runs[name][k] for k in ("seconds", "weights_bytes", "command", "lr")} if name in runs else {}),
               **evaluate(model, prompts, args)}
        results["models"][name] = row
        print(name, json.dumps(row), f"({time.perf_counter() - start:.0f} s to evaluate)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
