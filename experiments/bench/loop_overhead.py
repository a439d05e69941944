"""What the training loop costs around the net, and where a ``train.py`` run's time goes.

Runs ``python train.py OVERRIDES callbacks=[default,throughput] trainer.profiler=simple`` in a fresh run
directory and, in this process, the bare step of the same model at the same batch, precision and compilation:
forward, diffusion loss, backward, gradient clipping as configured, optimizer and LR-scheduler step -- no
Lightning, no EMA, no callbacks, no data loader (batches prepared beforehand). Reports:

- steady-state optimizer steps/s of the whole loop (``throughput.json`` of :class:`diffexp.callbacks.Throughput`,
  from step ``skip_steps`` to the last step, with validation, grids, checkpoints at the run's intervals) against
  the bare step's, and the overhead in percent;
- a time budget of the run: start-up (process start to the first training step: imports, config, data, model),
  the bare net steps, and the loop's parts from Lightning's SimpleProfiler (callbacks by name, validation,
  data fetching, optimizer step), wall time measured around the subprocess.

    python experiments/bench/loop_overhead.py experiment=quickstart --json experiments/results/speed/loop_quickstart_cpu.json
    python experiments/bench/loop_overhead.py data=shapes net=base data.batch_size=256 trainer=gpu \\
        trainer.max_steps=300 eval_every=100 --json experiments/results/gpu/loop_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def parse_profile(text: str) -> dict[str, dict]:
    """Rows of Lightning's SimpleProfiler table: action -> {mean_s, calls, total_s}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        try:
            rows[cells[0]] = {"mean_s": float(cells[1]), "calls": int(cells[2]), "total_s": float(cells[3])}
        except (IndexError, ValueError):  # the header, rules, the Total row
            continue
    return rows


def budget(profile: dict[str, dict], wall: float, startup: float, first_step: float, bare_step_s: float,
           steps: int) -> list[dict]:
    """Where the wall time went: start-up, the first step (compilation), the bare net steps, then the profiled
    parts of the loop."""
    def total(pattern: str) -> float:
        return sum(r["total_s"] for name, r in profile.items() if re.search(pattern, name))

    rows = [{"part": "start-up: imports, config, data, model, Trainer (to the first step)", "seconds": startup},
            {"part": "first step beyond a bare step (compilation, autotuning)", "seconds": first_step - bare_step_s},
            {"part": f"net steps, bare (forward, loss, backward, clip, optimizer) x {steps}",
             "seconds": bare_step_s * steps}]
    training = total(r"^run_training_batch$")
    rows.append({"part": "Lightning's training step around the bare step",
                 "seconds": training - first_step - bare_step_s * (steps - 1)})
    for name, r in sorted(profile.items(), key=lambda kv: -kv[1]["total_s"]):
        if name.startswith("[Callback]") and r["total_s"] >= 0.05:  # checkpoint writes count in ModelCheckpoint's
            rows.append({"part": "callback " + re.sub(r"\{.*\}", "", name.removeprefix("[Callback]")),
                         "seconds": r["total_s"]})
    rows.append({"part": "validation loop", "seconds": total(r"^run_validation|validation_step")
                 if "run_validation" not in profile else profile["run_validation"]["total_s"]})
    rows.append({"part": "data fetching (training)", "seconds": total(r"^\[_TrainingEpochLoop\]\.train_dataloader_next")})
    accounted = sum(r["seconds"] for r in rows)
    rows.append({"part": "rest (teardown, weights file, logging outside the profiler)", "seconds": wall - accounted})
    for r in rows:
        r["seconds"] = round(r["seconds"], 2)
        r["share"] = round(r["seconds"] / wall, 3)
    return rows


def bare_step_seconds(overrides: list[str], steps: int, warmup: int) -> tuple[float, dict]:
    """Seconds per bare optimizer step of the model ``train.py OVERRIDES`` builds, on the device it would use."""
    from diffexp.course import compose
    from diffexp.train import build, matmul_precision

    with tempfile.TemporaryDirectory() as tmp:
        model_overrides = [o for o in overrides if not o.lstrip("+").startswith("callbacks")]
        cfg = compose(model_overrides + ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"], tmp)
        datamodule, model, _, _, trainer = build(cfg)
    device = trainer.strategy.root_device
    torch.set_float32_matmul_precision(matmul_precision(cfg.get("matmul_precision", "highest"), trainer))
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark"))
    datamodule.setup("fit")
    model.conditioner.fit(datamodule)
    model.to(device).train()
    compile_net = (device.type == "cuda") if model.compile_net == "auto" else model.compile_net
    model.speed_up(compile=compile_net)
    optim = model.configure_optimizers()
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    loader = iter(datamodule.train_dataloader())
    batches = []
    for _ in range(min(steps + warmup, len(datamodule.train_dataloader()))):
        batch = next(loader)
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    precision = str(cfg.trainer.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in precision else nullcontext
    clip = cfg.trainer.get("gradient_clip_val")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model.loss(batches[i % len(batches)], generator=torch.Generator(device).manual_seed(i))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    info = {"device": str(device), "precision": precision, "compile": compile_net,
            "batch_size": int(cfg.data.batch_size)}
    return (time.perf_counter() - start) / steps, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. experiment=quickstart")
    parser.add_argument("--bare-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="loop_overhead_"))
    command = [sys.executable, str(ROOT / "train.py"), *args.overrides, "callbacks=[default,throughput]",
               f"trainer.profiler={{_target_:lightning.pytorch.profilers.SimpleProfiler,dirpath:{run_dir},"
               f"filename:profile}}", f"hydra.run.dir={run_dir}", "paths.latest_link=null"]
    print("$", " ".join(command), flush=True)
    launched = time.time()
    subprocess.run(command, check=True, cwd=run_dir, env={**os.environ, "WANDB_MODE": "offline"},
                   stdout=subprocess.DEVNULL)
    wall = time.time() - launched
    loop = json.loads((run_dir / "throughput.json").read_text())
    profile_file = next(run_dir.glob("*profile*.txt"), None)
    profile = parse_profile(profile_file.read_text()) if profile_file else {}
    bare, info = bare_step_seconds(list(args.overrides), args.bare_steps, args.warmup)
    loop_step = 1 / loop["steps_per_second"]
    total_steps = loop["from_step"] + loop["steps"]
    result = {**info, "overrides": args.overrides, "wall_seconds": round(wall, 1),
              "loop_steps_per_second": loop["steps_per_second"], "bare_steps_per_second": round(1 / bare, 3),
              "loop_overhead_percent": round(100 * (loop_step / bare - 1), 1),
              "budget": budget(profile, wall, loop["stamps"]["first_step"] - launched,
                               loop["stamps"]["first_step_end"] - loop["stamps"]["first_step"], bare, total_steps),
              "run_dir": str(run_dir)}
    print(json.dumps({k: v for k, v in result.items() if k != "budget"}, indent=2))
    print("| part | seconds | share |\n|---|---|---|")
    for row in result["budget"]:
        print(f"| {row['part']} | {row['seconds']} | {row['share']:.1%} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
