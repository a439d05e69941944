"""Peak memory of one DiT training step with and without gradient checkpointing (``net.gradient_checkpointing``).

Each setting runs in a fresh process (so one setting's allocator cache cannot hide the other's peak): it builds the
preset (``dit_xl/2`` by default, on 32x32x4 latents with 1,000 classes, as DiT-XL/2 at 256 px), runs ``--steps``
training steps (forward, MSE on epsilon, backward, AdamW) on a fixed batch, and reports

- on a GPU: ``torch.cuda.max_memory_allocated`` over the steps, and the allocation before the first step (weights);
- on the CPU: the process's peak resident set (``ru_maxrss``), and its resident set before the first step (weights,
  plus the Python and torch baseline).

The difference of the two settings' peaks is what checkpointing saves at that batch; the step times show its cost.

    python experiments/bench/dit_memory.py --preset dit_xl/2 --batch 4 --device cpu \\
        --json experiments/results/speed/dit_memory_cpu.json
    python experiments/bench/dit_memory.py --preset dit_xl/2 --batch 32 --json experiments/results/speed/dit_memory_h200.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def one_setting(args) -> dict:
    """Runs in the child: the peak memory and step time of ``--steps`` training steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_speed import inputs, ours

    device = torch.device(args.device)
    torch.manual_seed(0)
    net, cfg = ours(args.preset, args.image_size, args.channels, args.num_classes)
    net.gradient_checkpointing = args.checkpointing
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, t, labels, eps = inputs(net, args.batch, args.image_size, args.channels, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_bytes()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.mse_loss(net(x, t, class_labels=labels).float(), eps)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak, measure = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, measure = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident set (ru_maxrss)"
    return {"checkpointing": args.checkpointing, "peak_gib": round(peak / 2**30, 2),
            "before_first_step_gib": round(before / 2**30, 2), "measure": measure,
            "parameters": sum(p.numel() for p in net.parameters()),
            "step_seconds": [round(s, 2) for s in times], "last_step_seconds": round(times[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dit_xl/2", help="a DiT preset with its patch size")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="training steps (the first allocates AdamW's state)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--checkpointing", type=lambda v: v == "true", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")

    if args.checkpointing is not None:  # the child
        print(json.dumps(one_setting(args)))
        return
    passed = sys.argv[1:]
    rows = []
    for checkpointing in (False, True):
        child = subprocess.run([sys.executable, __file__, *passed, "--checkpointing", str(checkpointing).lower()],
                               capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"the checkpointing={checkpointing} run failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{args.preset} batch {args.batch} checkpointing={checkpointing!s:5s} peak {row['peak_gib']:6.2f} GiB "
              f"(before the first step {row['before_first_step_gib']:.2f}) | step {row['last_step_seconds']:.2f} s",
              flush=True)
    off, on = rows
    result = {"preset": args.preset, "batch": args.batch, "image_size": args.image_size, "channels": args.channels,
              "bf16": args.bf16, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "rows": rows,
              "peak_ratio_checkpointing_over_plain": round(on["peak_gib"] / off["peak_gib"], 3),
              "step_time_ratio_checkpointing_over_plain": round(on["last_step_seconds"] / off["last_step_seconds"], 3)}
    print(f"checkpointing: peak x{result['peak_ratio_checkpointing_over_plain']}, "
          f"step time x{result['step_time_ratio_checkpointing_over_plain']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
