"""The README's fine-tuning commands, copied from the README and run in a fresh working directory.

Only the placeholders are filled in (BASE.ckpt: the base run's checkpoint, RUN: the LoRA run) and training is
shrunk with the suite's SHRINK overrides, as for the other README commands."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, readme_command, run_as_typed, user_env

pytestmark = pytest.mark.slow


def latest_run(workdir):
    return (workdir / "logs" / "train" / "latest").resolve()


def test_readme_fine_tuning_commands_as_typed(fresh_workdir):
    run_as_typed(readme_command("python train.py experiment=shapes_text2img"), fresh_workdir)
    base = latest_run(fresh_workdir) / "checkpoints" / "last.ckpt"
    assert base.is_file()
    full = readme_command("python train.py experiment=shapes_star_finetune init_from=BASE.ckpt")
    result = run_as_typed(full.replace("BASE.ckpt", str(base)), fresh_workdir)
    assert "vocabulary extended by 1 words ['star']" in result.stdout + result.stderr
    lora = readme_command("python train.py experiment=shapes_star_finetune init_from=BASE.ckpt model.lora.rank=4 "
                          "model.optimizer.lr=2e-3")
    run_as_typed(lora.replace("BASE.ckpt", str(base)), fresh_workdir)
    run_dir = latest_run(fresh_workdir)
    adapter = run_dir / "checkpoints" / "adapter.safetensors"
    assert adapter.is_file() and adapter.stat().st_size < 512 * 1024

    outputs = {}
    for command in (readme_command('python sample.py ckpt=BASE.ckpt lora=RUN/checkpoints/adapter.safetensors '
                                   'prompt="a large red star in the center"'),
                    readme_command("python sample.py ckpt=BASE.ckpt lora=RUN/checkpoints/adapter.safetensors "
                                   "lora_merge=true n=16")):
        filled = command.replace("BASE.ckpt", str(base)).replace("RUN/", f"{run_dir}/")
        name = "merged" if "lora_merge" in command else "adapter"
        run_as_typed(filled + f" out=samples_{name}", fresh_workdir)  # SAMPLE_SHRINK: 3 steps
        summary = json.loads((fresh_workdir / f"samples_{name}" / "metrics.json").read_text())
        assert summary["lora"] == str(adapter)
        outputs[name] = np.load(fresh_workdir / f"samples_{name}" / "samples.npz")["images"]
    assert outputs["adapter"].shape == (64, 32, 32, 3) and outputs["merged"].shape == (16, 32, 32, 3)
    whole = run_dir / "checkpoints" / "model.safetensors"  # the fine-tuned run itself, adapters inside
    run_as_typed(f'python sample.py ckpt={whole} prompt="a large red star in the center" out=samples_run',
                 fresh_workdir)
    from_run = np.load(fresh_workdir / "samples_run" / "samples.npz")["images"]
    assert np.abs(from_run.astype(int) - outputs["adapter"].astype(int)).max() == 0  # base + adapter = the run

    script = readme_command("python experiments/scripts/finetune_concept.py --base BASE.ckpt")
    args = shlex.split(script.replace("BASE.ckpt", str(base)))
    command = [sys.executable, str(ROOT / args[1]), *args[2:], "--steps", "2", "--n", "4", "--sampler-steps", "3", "--methods", "full",
               "lora:4", "--work", str(fresh_workdir / "ft"), "--out", str(fresh_workdir / "ft" / "result")]
    result = subprocess.run(command, cwd=fresh_workdir, env=user_env(fresh_workdir), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((fresh_workdir / "ft" / "result.json").read_text())
    assert set(table["models"]) == {"base", "full", "lora_r4"}
    assert table["models"]["lora_r4"]["trainable_parameters"] < table["models"]["full"]["trainable_parameters"]
    assert "| lora_r4 |" in (fresh_workdir / "ft" / "result.md").read_text()
