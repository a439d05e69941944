#!/usr/bin/env bash
# Every GPU measurement of the DiT issue in one go (about 6 minutes on an H200), results in $OUT:
#   1. training step of dit_b/2 on 32x32x4 latents at batch 256 against diffusers' DiTTransformer2DModel of the
#      same config (bf16, bf16 + compile), with the share of the dense bf16 peak;
#   2. peak training memory of dit_xl/2 at batch 32 (bf16) with and without gradient checkpointing;
#   3. trainer=fsdp on one GPU: train.py 20 steps of dit_s/2 on shapes, then resumed to 30.
#     OUT=experiments/results/gpu bash experiments/bench/gpu_dit.sh
# A dry run on the CPU: PRESET=dit_tiny/4 BATCH=8 MEM_PRESET=dit_tiny/4 MEM_BATCH=2 DEVICE=cpu FSDP_TRAINER=fsdp_cpu FSDP_NET=dit_tiny
set -uo pipefail
OUT=${OUT:-experiments/results/gpu}
PRESET=${PRESET:-dit_b/2}
BATCH=${BATCH:-256}
MEM_PRESET=${MEM_PRESET:-dit_xl/2}
MEM_BATCH=${MEM_BATCH:-32}
DEVICE=${DEVICE:-cuda}
MODES=${MODES:-bf16 bf16_compile}
SECTIONS=" ${SECTIONS:-1 2 3} "
source "$(dirname "$0")/gpu_common.sh"

if [[ $SECTIONS == *" 1 "* ]]; then
echo "== 1. DiT training step against diffusers"
timeout 300 python3 experiments/bench/train_speed.py --presets "$PRESET" --image-size 32 --channels 4 \
    --batch "$BATCH" --modes $MODES --steps 10 --rounds 2 --device "$DEVICE" --json "$OUT/dit_speed.json" 2>&1 \
    | grep -v Warning | tee "$OUT/dit_speed.log"
fi
if [[ $SECTIONS == *" 2 "* ]]; then
echo "== 2. DiT peak training memory, with and without gradient checkpointing"
timeout 200 python3 experiments/bench/dit_memory.py --preset "$MEM_PRESET" --batch "$MEM_BATCH" --bf16 \
    --device "$DEVICE" --json "$OUT/dit_memory.json" 2>&1 | grep -v Warning | tee "$OUT/dit_memory.log"
fi
if [[ $SECTIONS == *" 3 "* ]]; then
echo "== 3. trainer=fsdp on one GPU, then resumed"
run=$(mktemp -d)
args=(trainer=${FSDP_TRAINER:-fsdp} callbacks=fsdp trainer.devices=${FSDP_DEVICES:-1} net=${FSDP_NET:-dit_s} data=shapes data.num_train=2048 eval_every=1000
      trainer.max_steps=20 callbacks.model_checkpoint.every_n_train_steps=10 logger=csv paths.latest_link=null
      trainer.enable_progress_bar=false)
timeout 150 python3 train.py "${args[@]}" hydra.run.dir="$run/full" 2>&1 | grep -v Warning | tail -30 \
    | tee "$OUT/fsdp.log"
timeout 120 python3 train.py "${args[@]}" trainer.max_steps=30 hydra.run.dir="$run/resumed" \
    ckpt_path="$run/full/checkpoints/step0000010.ckpt" 2>&1 | grep -v Warning | tail -15 | tee -a "$OUT/fsdp.log"
ls -la "$run/full/checkpoints" "$run/resumed/checkpoints" | tee -a "$OUT/fsdp.log"
python3 - "$run" <<'PY' 2>&1 | tee -a "$OUT/fsdp.log"
import sys, torch
from diffexp.checkpoints import load_file
run = sys.argv[1]
full, resumed = (load_file(f"{run}/{d}/checkpoints/step0000020.ckpt")["state_dict"] for d in ("full", "resumed"))
diff = max((full[k].float() - resumed[k].float()).abs().max().item() for k in full)
print(f"step 20, straight vs resumed from step 10: {len(full)} tensors, max |difference| {diff:.3g}")
PY
fi
echo "== done"
