# Sourced by the GPU benchmark scripts: the output folder, the environment, and the device in $OUT/device.txt.
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/device.txt"
