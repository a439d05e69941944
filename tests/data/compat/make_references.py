"""Write the reference samples that tests/test_compat.py compares against: `sample.py` on every shipped course
model and format-1 fixture with DDIM-50, DPM-Solver++(2M)-20 and DDPM (all 1,000 steps), seed 0, on the CPU.

Run once at the commit named in manifest.json, before the continuous-time core replaced the discrete one; the
files it wrote are what the old code sampled. Rerunning it now would compare the current code with itself.

    python tests/data/compat/make_references.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
FORMAT1 = ROOT / "tests" / "data" / "format1"
PRETRAINED = ROOT / "src" / "diffexp" / "pretrained"

# sampler option -> extra overrides; n per sampler (DDPM's 1,000 steps on two images)
SAMPLERS = {"ddim50": (["sampler=ddim", "sampler.steps=50"], 4), "dpmpp2m20": (["sampler=dpmpp_2m", "sampler.steps=20"], 4),
            "ddpm": (["sampler=ddpm"], 2)}
# more samplers and the editing paths, on the shipped digits model only
DIGITS_EXTRA = {name: ([f"sampler={name}", "sampler.steps=10"], 4) for name in
                ("heun", "unipc", "dpmpp_3m", "dpmpp_2m_sde", "euler", "euler_ancestral")}
DIGITS_EXTRA.update({
    "sdedit": (["sampler=ddim", "sampler.steps=50", f"init_image={HERE / 'digit.png'}", "strength=0.6"], 4),
    "inpaint": (["sampler=dpmpp_2m", "sampler.steps=20", f"init_image={HERE / 'digit.png'}",
                 f"mask={HERE / 'mask.png'}", "jump_length=5", "jump_n_sample=2"], 4),
    "inpaint_ddpm": (["sampler=ddim", "sampler.steps=50", "sampler.eta=1.0", f"init_image={HERE / 'digit.png'}",
                      f"mask={HERE / 'mask.png'}", "strength=0.8"], 4)})
MODELS = {**{name: PRETRAINED / name / "model.safetensors" for name in
             ("digits", "digits_quadratic", "digits_cosine", "shapes_text", "shapes_latent")},
          "format1_class": FORMAT1 / "class.ckpt", "format1_text": FORMAT1 / "text.ckpt",
          "format1_latent": FORMAT1 / "latent.ckpt"}


def format1_latent(tmp: Path) -> Path:
    """The format-1 latent checkpoint, its VAE path pointed at the fixture beside it (as the tests do)."""
    checkpoint = torch.load(FORMAT1 / "latent.ckpt", map_location="cpu", weights_only=False)
    shutil.copy(FORMAT1 / "vae.ckpt", tmp / "vae.ckpt")
    checkpoint["diffexp_config"]["vae"]["ckpt"] = str(tmp / "vae.ckpt")
    torch.save(checkpoint, tmp / "latent.ckpt")
    return tmp / "latent.ckpt"


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    manifest = {"commit": commit, "torch": torch.__version__, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model, ckpt in MODELS.items():
            if model == "format1_latent":
                ckpt = format1_latent(tmp)
            for sampler, (overrides, n) in {**SAMPLERS, **(DIGITS_EXTRA if model == "digits" else {})}.items():
                out = tmp / f"{model}_{sampler}"
                args = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", f"n={n}", "seed=0", "device=cpu",
                        "progress=false", f"out={out}", *overrides]
                subprocess.run(args, cwd=tmp, check=True, capture_output=True)
                images = np.load(out / "samples.npz")["images"]
                name = f"{model}_{sampler}.npz"
                np.savez_compressed(HERE / name, images=images)
                manifest["files"][name] = {"ckpt": str(Path(ckpt).relative_to(ROOT)) if model != "format1_latent"
                                           else "tests/data/format1/latent.ckpt", "args": [f"n={n}", "seed=0", "device=cpu",
                                                                                        *(a.replace(str(HERE), "tests/data/compat") for a in overrides)]}
                print(name, images.shape, flush=True)
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
