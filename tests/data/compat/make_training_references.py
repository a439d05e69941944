"""Write training.json, which tests/test_compat.py compares against: the training and validation losses of a few
steps of train.py (the suite's SHRINK settings) for today's objectives, and uint8 samples of the weights they end
with (DDIM-5 from fixed noise).

Run once at the commit named in training.json, before the continuous-time core replaced the discrete one.

    python tests/data/compat/make_training_references.py
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

# name -> overrides on top of the suite's SHRINK list (experiment=quickstart: epsilon, min-SNR 5)
RUNS = {
    "quickstart": [],
    "v_prediction": ["model.prediction_type=v_prediction"],
    "sample_cosine_no_min_snr": ["model.prediction_type=sample", "schedule=cosine", "model.min_snr_gamma=null"],
    "v_ztsnr": ["model.prediction_type=v_prediction", "schedule.rescale_zero_terminal_snr=true",
                "sampler.timestep_spacing=trailing"],
    "class": ["text_encoder=class"],
    "text": ["experiment=shapes_text2img", "data.num_train=32", "data.num_val=8", "text_encoder.dim=16",
             "text_encoder.heads=2", "unet.num_heads=2", "unet.base_channels=8", "unet.channel_mult=[1,2]",
             "callbacks.sample_grid.n=2"],
}


def losses(run_dir: Path) -> dict:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {"train/loss": [float(r["train/loss"]) for r in rows if r.get("train/loss")],
            "val/loss": [float(r["val/loss"]) for r in rows if r.get("val/loss")]}


def main() -> None:
    from tests.conftest import SHRINK

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record, samples = {"commit": commit, "shrink": SHRINK, "runs": {}}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            run_dir = Path(tmp) / name
            subprocess.run([sys.executable, str(ROOT / "train.py"), *SHRINK, *overrides, f"hydra.run.dir={run_dir}",
                            "paths.latest_link=null"], cwd=tmp, check=True, capture_output=True)
            out = Path(tmp) / f"{name}_samples"
            subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                            "n=4", "seed=0", "device=cpu", "progress=false", "sampler=ddim", "sampler.steps=5",
                            f"out={out}"], cwd=tmp, check=True, capture_output=True)
            images = np.load(out / "samples.npz")["images"]
            samples[name] = images
            record["runs"][name] = {"overrides": overrides, **losses(run_dir)}
            print(name, record["runs"][name]["train/loss"], flush=True)
    (HERE / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    np.savez_compressed(HERE / "training_samples.npz", **samples)


if __name__ == "__main__":
    main()
