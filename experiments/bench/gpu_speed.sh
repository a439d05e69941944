#!/usr/bin/env bash
# Every GPU measurement of the speed issue in one go (under 10 minutes on an H200), results in $OUT:
#   1. net-level training table (ours vs diffusers, fp32 / bf16 / bf16 + compile) and sampling img/s
#      (DDIM-50 and DPM-Solver++(2M)-10; fp32, bf16, bf16 + compile);
#   2. the per-step training loop against the bare step (train.py with every default callback; no grids or
#      validation inside the timed window, whose cost per interval the CPU budget table shows);
#   3. sample.py DDIM-50 at batch 1,024, bf16 + compile, from the weights of step 2.
#     OUT=experiments/results/gpu bash experiments/bench/gpu_speed.sh
# Sizes can be shrunk for a dry run on the CPU: PRESET=tiny BATCH=8 SAMPLE_BATCH=8 LOOP_STEPS=30 N=16 DEVICE=cpu
set -uo pipefail
OUT=${OUT:-experiments/results/gpu}
PRESET=${PRESET:-base}
BATCH=${BATCH:-256}
SAMPLE_BATCH=${SAMPLE_BATCH:-1024}
LOOP_STEPS=${LOOP_STEPS:-300}
N=${N:-8192}
DEVICE=${DEVICE:-cuda}
MODES=${MODES:-fp32 bf16 bf16_compile}
SECTIONS=" ${SECTIONS:-1 2 3} "   # e.g. SECTIONS="2 3" to rerun the last two
source "$(dirname "$0")/gpu_common.sh"

if [[ $SECTIONS == *" 1 "* ]]; then
echo "== 1. net-level training and sampling throughput"
timeout 300 python3 experiments/bench/train_speed.py --presets "$PRESET" --modes $MODES --batch "$BATCH" \
    --steps 10 --rounds 2 --sample --sample-preset "$PRESET" --samplers ddim:50 dpmpp_2m:10 \
    --sample-batch "$SAMPLE_BATCH" --sample-rounds 1 --sample-compile default --device "$DEVICE" \
    --json "$OUT/train_speed.json" 2>&1 \
    | grep -v Warning | tee "$OUT/train_speed.log"

fi
if [[ $SECTIONS == *" 2 "* ]]; then
echo "== 2. whole loop vs bare step"
trainer=gpu
[ "$DEVICE" = cpu ] && trainer=default
timeout 180 python3 experiments/bench/loop_overhead.py data=shapes net="$PRESET" data.batch_size="$BATCH" \
    trainer=$trainer trainer.max_steps="$LOOP_STEPS" eval_every=100000 trainer.log_every_n_steps=50 \
    callbacks.throughput.skip_steps=$((LOOP_STEPS / 3)) --bare-steps 100 \
    --json "$OUT/loop_overhead.json" 2>&1 | grep -v Warning | tee "$OUT/loop_overhead.log"

fi
if [[ $SECTIONS == *" 3 "* ]]; then
echo "== 3. sample.py, DDIM-50, bf16 + compile"
ckpt=$(python3 -c "import json; print(json.load(open('$OUT/loop_overhead.json'))['run_dir'])")/checkpoints/model.safetensors
timeout 100 python3 sample.py ckpt="$ckpt" n="$N" batch_size="$SAMPLE_BATCH" sampler=ddim sampler.steps=50 \
    precision=bf16 compile=true progress=false out="$(mktemp -d)/sample" grid_max=64 2>&1 \
    | grep -v Warning | tail -25 | tee "$OUT/sample.log"
fi
echo "== done"
