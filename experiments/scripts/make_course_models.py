"""Make the course models shipped in src/diffexp/pretrained/ with the presets' own commands.

    python experiments/scripts/make_course_models.py train --runs RUNS            # every preset's train.py run
    python experiments/scripts/make_course_models.py train --runs RUNS --only digits --jobs 1
    python experiments/scripts/make_course_models.py pack --runs RUNS             # fp16 safetensors + model cards

``train`` runs ``python train.py <preset overrides> hydra.run.dir=RUNS/<name>`` for each model (those that do not
depend on another at once, ``--jobs`` at a time; the latent model after its autoencoder). ``pack`` measures each
run (digits: fid_digits and the digits classifier's confident fraction; text-to-image: caption adherence at guidance
3 with few-step samplers; VAE: held-out PSNR; latent: fid_shapes), then writes
``src/diffexp/pretrained/<name>/model.safetensors`` (EMA weights in float16, the run config inside, as
train.py's model.safetensors), ``metrics.csv`` (the training curves) and ``README.md`` (the model card).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from diffexp.pretrained import MODELS, WEIGHTS  # noqa: E402

HALF_MIN_NUMEL = 1024  # tensors this large are stored in float16; smaller ones (scales, biases) stay float32


def train_command(name: str, runs: Path, extra: list[str] = ()) -> list[str]:
    overrides = [o.format(runs=runs) for o in MODELS[name].overrides]
    return [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={runs / name}",
            "trainer.enable_progress_bar=false", "paths.latest_link=null", *extra]


def train_all(names: list[str], runs: Path, jobs: int, extra: list[str] = ()) -> dict[str, float]:
    """Run the train.py commands, independent ones ``jobs`` at a time; returns wall seconds per model."""
    runs.mkdir(parents=True, exist_ok=True)
    pending, running, walls = list(names), {}, {}
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    while pending or running:
        for name in list(pending):
            dep = MODELS[name].depends_on
            ready = dep is None or dep not in names or (dep in walls and dep not in running)
            if ready and len(running) < jobs:
                command = train_command(name, runs, extra)
                print("$", " ".join(command[1:]), flush=True)
                log = open(runs / f"{name}.log", "w")
                running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                                 time.perf_counter(), log)
                pending.remove(name)
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                walls[name] = time.perf_counter() - start
                del running[name]
                status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {runs / name}.log"
                print(f"[{name}] {status} in {walls[name]:.0f} s", flush=True)
                if proc.returncode:
                    pending = [p for p in pending if MODELS[p].depends_on != name]
        time.sleep(1)
    return walls


def to_shipped(state: dict) -> dict:
    """Floating-point tensors of at least HALF_MIN_NUMEL elements in float16, the rest as they are."""
    return {k: v.half() if torch.is_tensor(v) and v.is_floating_point() and v.numel() >= HALF_MIN_NUMEL else v
            for k, v in state.items()}


def measure(name: str, weights: Path, n: int) -> dict:
    """The figures of a shipped model's card, measured on the shipped (float16) file, on the CPU."""

    from diffexp.config import data_of_run
    from diffexp.course import load, sampler
    from diffexp.metrics import evaluate
    from diffexp.api import draw_samples

    if name == "shapes_vae":
        sys.path.insert(0, str(Path(__file__).parent))
        from evaluate_vae import held_out_reconstructions

        _, images, _, psnr = held_out_reconstructions(weights, 1000)
        return {"held-out PSNR (dB), mean over %d validation images" % len(images): round(psnr.mean().item(), 2)}
    model, cfg = load(weights)
    datamodule = data_of_run(cfg)
    figures = {}
    if cfg.get("text_encoder"):  # text-to-image: caption adherence
        from diffexp.metrics.adherence import caption_adherence

        captions = datamodule.captions("val")
        captions = [captions[i % len(captions)] for i in range(n)]
        for label, steps, spacing in [("DDIM-10", 10, "leading"), ("DDIM-20", 20, "leading"),
                                      ("DPM-Solver++(2M)-5 trailing", 5, "trailing")]:
            kind = "ddim" if label.startswith("DDIM") else "dpmpp_2m"
            images = draw_samples(model, n, sampler(model, kind, steps, timestep_spacing=spacing), seed=0,
                                  batch_size=250, conditions={"captions": captions}, progress=False,
                                  guidance_scale=3.0)
            figures[f"caption adherence, {label}, guidance 3, N={n}"] = round(
                caption_adherence(images, captions)["adherence"], 4)
        return figures
    kind, steps = MODELS[name].sampler
    label = {"ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "consistency": "consistency sampling"}.get(kind, kind)
    label = f"{label}-{steps}"
    images = draw_samples(model, n, sampler(model, kind, steps), seed=0, batch_size=250, progress=False)
    if name.startswith("digits"):
        scores = evaluate(["fid_digits", "digits_classifier"], images, datamodule)
        figures[f"fid_digits, {label}, N={n}"] = round(scores["fid_digits"]["value"], 3)
        figures[f"digits classifier confident fraction, {label}, N={n}"] = round(
            scores["digits_classifier"]["confident_fraction"], 4)
    else:
        scores = evaluate(["fid_shapes"], images, datamodule)
        figures[f"fid_shapes, {label}, N={n}"] = round(scores["fid_shapes"]["value"], 3)
    return figures


CARD = """# {name}

{description}. Shipped with diffexp for the course notebooks ({notebooks}); loaded by
`diffexp.course.pretrained("{name}")`, or sampled with `python sample.py ckpt=src/diffexp/pretrained/{name}/{weights}{sample_args}`.

| | |
|---|---|
| made by | `python train.py {overrides}` |
| data | {data} |
| training | {steps:,} steps, batch {batch}, seed {seed}; {wall:.0f} s on {device} |
| code | diffexp commit `{commit}`{dirty} |
| weights | EMA, float16 (tensors under {half_min} elements in float32); {params:,} parameters, {size_kib:,.0f} KiB |
| curves | `metrics.csv` (the run's CSV log: train/loss, val/loss, learning rate) |

## Measured (on the shipped float16 weights, CPU)

{figures}

Measured by `python experiments/scripts/make_course_models.py pack --runs RUNS --only {name}` (seed 0).
"""


def describe_data(cfg: dict) -> str:
    data = cfg["data"]
    size = f"{data.get('image_size')}x{data.get('image_size')}"
    if data["_target_"].endswith("DigitsDataModule"):
        return f"scikit-learn's bundled 8x8 digits (1,797 images), upscaled to {size}"
    if data["_target_"].endswith("ShapesDataModule"):
        return f"procedural captioned shapes, {data['num_train']:,} training images at {size} (seed {data['seed']})"
    return data["_target_"]


def pack(name: str, run: Path, out: Path, overwrite: bool, n: int, trained_on: str, shared: int = 5) -> Path:
    """Ship the run's ``model.safetensors`` as ``out/name``: float16 weights, curves, model card (measured)."""
    from diffexp.checkpoints import read_weights, save_weights

    source = run / "checkpoints" / WEIGHTS
    if not source.is_file():
        sys.exit(f"error: {source} does not exist; train it first (the train stage)")
    dest = out / name
    if dest.exists() and not overwrite:
        sys.exit(f"error: {dest} exists; pass --overwrite to replace it")
    checkpoint = read_weights(source)
    config = checkpoint["diffexp_config"]
    if (config.get("vae") or {}).get("ckpt"):
        config["vae"]["ckpt"] = None  # the autoencoder's weights travel inside this file (its architecture too)
    dest.mkdir(parents=True, exist_ok=True)
    state = to_shipped(checkpoint["state_dict"])
    weights = save_weights(state, config, dest / WEIGHTS)
    shutil.copyfile(run / "csv" / "metrics.csv", dest / "metrics.csv")
    info = json.loads((run / "run_info.json").read_text())
    walls = dict(line.split() for line in (run.parent / "walls.txt").read_text().splitlines()) \
        if (run.parent / "walls.txt").is_file() else {}
    figures = measure(name, weights, n)
    sharing = f", sharing it with the other course runs (`--jobs {shared}`)" if shared > 1 else ""
    params = sum(v.numel() for v in state.values() if torch.is_tensor(v))
    model = MODELS[name]
    overrides = " ".join(re.sub(r"\{runs\}/(\w+)/", lambda m: f"{m.group(1).upper()}_RUN/", o) for o in model.overrides)
    card = CARD.format(
        name=name, description=model.description[0].upper() + model.description[1:], weights=WEIGHTS,
        sample_args=("" if model.sampler == ("ddim", 20) else f" sampler={model.sampler[0]} sampler.steps={model.sampler[1]}")
        + (' prompt="a large red circle in the center" guidance_scale=3' if config.get("text_encoder") else ""),
        notebooks=", ".join(model.notebooks), overrides=overrides, data=describe_data(config),
        steps=config["trainer"]["max_steps"], batch=config["data"]["batch_size"], seed=config["seed"],
        wall=float(walls.get(name, "nan")), device=f"{trained_on} (torch {info['packages']['torch']}, Lightning {info['packages']['lightning']}){sharing}",
        commit=info["git"]["commit"][:10], dirty=" (with uncommitted changes)" if info["git"].get("dirty") else "",
        half_min=HALF_MIN_NUMEL, params=params, size_kib=weights.stat().st_size / 1024,
        figures="\n".join(f"- {k}: **{v}**" for k, v in figures.items()))
    (dest / "README.md").write_text(card)
    (dest / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"[{name}] {weights} ({weights.stat().st_size / 2**20:.2f} MiB): {figures}", flush=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "pack"])
    parser.add_argument("--runs", type=Path, required=True, help="where the training runs go / are read from")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(MODELS), help="these models only")
    parser.add_argument("--jobs", type=int, default=1, help="train this many models at once")
    parser.add_argument("--set", nargs="*", default=[], help="train: extra overrides (e.g. a short dry run)")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "diffexp" / "pretrained", help="pack: destination")
    parser.add_argument("--overwrite", action="store_true", help="pack: replace shipped models that exist")
    parser.add_argument("--trained-on", default="one NVIDIA H200 GPU", help="pack: the training hardware, for the card")
    parser.add_argument("--shared", type=int, default=5, help="pack: how many course runs shared that hardware (--jobs)")
    parser.add_argument("--n", type=int, default=500, help="pack: samples per measurement")
    args = parser.parse_args()
    names = args.only or list(MODELS)
    runs = args.runs.resolve()
    if args.stage == "train":
        walls = train_all(names, runs, args.jobs, args.set)
        record = runs / "walls.txt"  # every model's latest wall time (earlier runs' lines kept)
        known = dict(line.split() for line in record.read_text().splitlines()) if record.is_file() else {}
        known.update({n: f"{w:.1f}" for n, w in walls.items()})
        record.write_text("".join(f"{n} {w}\n" for n, w in known.items()))
        if len(walls) < len(names) or any((runs / n / "checkpoints" / "model.safetensors").is_file() is False
                                          for n in walls):
            sys.exit("error: some runs failed (see the logs above)")
    else:
        for name in names:
            pack(name, runs / name, args.out, overwrite=args.overwrite, n=args.n, trained_on=args.trained_on,
                 shared=args.shared)


if __name__ == "__main__":
    main()
