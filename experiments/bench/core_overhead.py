"""What the continuous-time core costs: the quickstart's training step and DDIM-50 sampling, this tree against
the discrete-time code (a git commit, checked out into a temporary worktree), measured in the same run.

    python experiments/bench/core_overhead.py --baseline 1162283 --json experiments/results/speed/core_overhead_cpu.json

Each round runs one fresh process per tree (interleaved, so drift of the machine hits both): it builds the
quickstart model from the tree's own config (``experiment=quickstart``; this tree adds ``--current-overrides``,
default ``formulation=ddpm``: the baseline's quickstart was DDPM's, this tree's is rectified flow), times ``--steps`` training steps on
digits batches of 64 (``model.loss`` with the per-step generator, backward, AdamW; the data prepared beforehand)
after ``--warmup`` steps, and DDIM-50 sampling of ``--n`` images from fixed noise. The report gives the median
images/s of each tree over ``--rounds`` rounds and their ratio (this tree / baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORKER = r'''
import json, sys, time
from functools import partial
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
from diffexp.course import compose
from diffexp.config import build_model, data_of_run
from diffexp.samplers import DDIMSampler
root, steps, warmup = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
n = int(sys.argv[5])
cfg = compose(["experiment=quickstart", "trainer.accelerator=cpu", *sys.argv[6:]], root / "out", "train", root_dir=root / "out")
datamodule = data_of_run(cfg, from_checkpoint=False)
model = build_model(cfg, datamodule)
datamodule.setup("fit")
dataset = datamodule.dataset("train")
images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
batches = [{"image": images[(64 * i) % (len(images) - 64):][:64]} for i in range(steps + warmup)]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model.train()
def step(i):
    loss = model.loss(batches[i], generator=torch.Generator().manual_seed(i))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
for i in range(warmup):
    step(i)
start = time.perf_counter()
for i in range(warmup, warmup + steps):
    step(i)
train = steps * 64 / (time.perf_counter() - start)
model.eval()
x_T = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
sampler = partial(DDIMSampler, steps=50, progress=False)
model.sample(8, sampler=sampler, x_T=x_T[:8])  # warm-up
start = time.perf_counter()
model.sample(n, sampler=sampler, x_T=x_T)
sample = n / (time.perf_counter() - start)
print(json.dumps({"train_images_per_s": train, "ddim50_images_per_s": sample}))
'''


def measure(src: Path, conf_root: Path, args, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "conf").symlink_to(conf_root / "conf")
        env = {**os.environ, "PYTHONPATH": str(src), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-c", WORKER, tmp, str(args.steps), str(args.warmup),
                                 str(args.threads), str(args.n), *overrides], env=env, cwd=tmp, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"worker failed for {src}:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a git commit of the discrete-time code, e.g. 1162283")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--current-overrides", nargs="*", default=["formulation=ddpm"],
                        help="train.py overrides for this tree only (the baseline has no formulation group)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs = {"current": [], "baseline": []}
            for _ in range(args.rounds):
                runs["current"].append(measure(ROOT / "src", ROOT, args, args.current_overrides))
                runs["baseline"].append(measure(baseline / "src", baseline, args))
                print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, capture_output=True)
    report = {"baseline": args.baseline, "current_overrides": args.current_overrides, "rounds": args.rounds, "steps": args.steps, "n": args.n, "threads": args.threads}
    for key in ("train_images_per_s", "ddim50_images_per_s"):
        current = statistics.median(r[key] for r in runs["current"])
        base = statistics.median(r[key] for r in runs["baseline"])
        report[key] = {"current": round(current, 1), "baseline": round(base, 1), "ratio": round(current / base, 4)}
    report["runs"] = runs
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
