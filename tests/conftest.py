"""Shared fixtures: composed and shrunk configs, a tiny trained checkpoint."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, further limited by a cgroup v2 quota (a container
    can see every core of its host and be allowed two; torch would start a thread per visible core)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def xdist_workers() -> int:
    """How many pytest-xdist workers share the CPUs (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per usable CPU (not per visible core), at most 8."""
    return min(8, usable_cpus())


# an explicit OMP_NUM_THREADS wins; the one this file sets for its own subprocesses is not the user's
USER_THREADS = os.environ.setdefault("DIFFEXP_USER_OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))


def threads_per_process(workers: int) -> int:
    """Torch/BLAS threads of one test process: the user's OMP_NUM_THREADS, else an equal share of (at most 2)
    usable CPUs between ``workers`` processes, at least 1."""
    return int(USER_THREADS) if USER_THREADS else max(1, min(2, usable_cpus()) // max(1, workers))


THREADS = threads_per_process(xdist_workers())
# set before numpy and torch load (their BLAS sizes its pool then); the subprocesses the tests start inherit it
for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[name] = str(THREADS)

import numpy as np
import torch
from omegaconf import DictConfig

from diffexp.course import compose

torch.set_num_threads(THREADS)


def pytest_report_header(config):
    """The CPU facts a slow CI run is read against (visible cores, usable cores, torch's threads)."""
    workers = config.getoption("numprocesses", None) or 0
    return (f"cpus: {os.cpu_count()} visible, {usable_cpus()} usable; xdist workers: {workers}; "
            f"torch threads per test process: {threads_per_process(workers)}")

# settings that make any training config finish in seconds on a CPU: the one list a test of a README
# command may add (the `++` entries shrink the FID callback where a preset has one and are ignored otherwise)
SHRINK = [
    "trainer.max_steps=4",
    "eval_every=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.batch_size=8",
    "callbacks.sample_grid.n=4",
    "callbacks.denoising_grid.num_images=2",
    "callbacks.denoising_grid.frames=3",
    "sampler.steps=3",
    "sampler.progress=false",
    "++callbacks.fid.every_n_steps=4",
    "++callbacks.fid.num_samples=16",
    "++callbacks.fid.batch_size=16",
]

README = ROOT / "README.md"
WORDS = ["a", "small", "large", "red", "blue", "circle", "square", "in", "the", "top", "left", "center"]


def readme_commands() -> list[str]:
    """Every shell command in the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).rstrip() if not line.lstrip().startswith("#") else ""
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                commands.append(line)
    return commands


def readme_command(command: str) -> str:
    """``command``, checked to stand in the README exactly so: a test copies a README command verbatim and
    fails when the README changes it, so tests cannot drift from what users read."""
    assert command in readme_commands(), f"the README no longer has the command {command!r}"
    return command


def user_env(workdir: Path, **extra: str) -> dict:
    """The environment of a user's shell: offline W&B and hub, a private cache under ``workdir``."""
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "DIFFEXP_CACHE": str(workdir / ".cache"),
            **extra}


# the one override a test of a README sample.py command may add, and only where the command sets no steps of its
# own: the default 50 DDIM steps of a text model's 64 images take minutes on a CPU
SAMPLE_SHRINK = ["sampler.steps=3"]


def run_as_typed(command: str, workdir: Path, shrink: bool = True, timeout: float = 900,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a README command as a user types it, from ``workdir``, with only SHRINK appended (``shrink``; to a
    ``python sample.py`` command SAMPLE_SHRINK, where it names no ``sampler.steps``).
    ``python`` is this interpreter; the installed diffexp package is the one under test."""
    args = shlex.split(command)
    assert args[0] == "python", command
    if not shrink:
        extra = []
    elif args[1] == "sample.py":
        extra = [] if any(a.startswith("sampler.steps=") for a in args) else SAMPLE_SHRINK
    else:
        extra = SHRINK
    args = [sys.executable, *args[1:], *extra]
    result = subprocess.run(args, cwd=workdir, env=env or user_env(workdir), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def sweep_dir(workdir):
    """The one sweep directory a multirun made under WORKDIR/logs/train/multiruns/."""
    sweeps = sorted((workdir / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def job_dirs(sweep):
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def compare_rows(sweep, workdir):
    """Rows of `python -m diffexp.compare SWEEP` (header, then one dict per job)."""
    result = subprocess.run([sys.executable, "-m", "diffexp.compare", str(sweep)], cwd=workdir,
                            env=user_env(workdir), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = (sweep / "compare" / "compare.md").read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture
def fresh_workdir(tmp_path) -> Path:
    """A new directory laid out like a checkout's top level (train.py, sample.py, conf/), to run README
    commands from as a user would, with nothing from earlier runs."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    for name in ("train.py", "sample.py"):
        shutil.copy(ROOT / name, workdir / name)
    shutil.copytree(ROOT / "conf", workdir / "conf")
    return workdir


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a primary config as Hydra would for a run in ``output_dir``."""
    return compose(overrides, output_dir, config_name, root_dir=output_dir)


@pytest.fixture
def train_cfg(tmp_path):
    """Factory: compose train.yaml, shrunk, into tmp_path/run (extra overrides win)."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", SHRINK + list(overrides), tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a few quickstart training steps (rectified flow; trained once per test session)."""
    from diffexp.train import run

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_config("train", SHRINK, out)
    run(cfg)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_ddpm_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a few steps of the DDPM quickstart (formulation=ddpm; trained once per test session)."""
    from diffexp.train import run

    out = tmp_path_factory.mktemp("tiny_ddpm_run")
    run(compose_config("train", SHRINK + ["formulation=ddpm"], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_class_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a few steps of the class-conditional quickstart (conditioning=class; trained once per session)."""
    from diffexp.train import run

    out = tmp_path_factory.mktemp("tiny_class_run")
    run(compose_config("train", SHRINK + ["conditioning=class"], out))
    return out / "checkpoints" / "last.ckpt"


def tiny_hf_folder(tmp_path, kind: str):
    """A random-weight CLIP text model or T5 encoder + a word-level tokenizer, saved as a local folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                             pad_token_id=0, bos_token_id=2, eos_token_id=3))
    else:
        model = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=24, d_kv=8, d_ff=48, num_layers=2,
                                        num_heads=3, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def run_script(script: str, *args: str, cwd=None, env: dict | None = None, timeout: float = 900,
               check: bool = False) -> subprocess.CompletedProcess:
    """``python ROOT/<script> ARGS`` (train.py, sample.py) from ``cwd`` (default ROOT) in a user's environment
    (:func:`user_env` of ``cwd``: offline, a private cache);
    with ``check`` a non-zero exit fails the test with the output's tail."""
    if env is None:
        env = user_env(Path(cwd)) if cwd is not None else {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    target = [script] if script.startswith("-") else [str(ROOT / script)]  # "-m", "diffexp.build": a module
    result = subprocess.run([sys.executable, *target, *args], cwd=cwd or ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{script} {args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


# a few seconds of autoencoder training on shapes
VAE_SHRINK = [
    "experiment=shapes_vae", "trainer.max_steps=4", "trainer.limit_val_batches=1",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "data.batch_size=8", "data.num_train=64", "data.num_val=16", "model.net.base_channels=16",
    "eval_every=2", "paths.latest_link=null",
]


@pytest.fixture(scope="session")
def vae_ckpt(tmp_path_factory) -> Path:
    """A shapes VAE checkpoint of a few training steps (trained once per test session)."""
    from diffexp.train import run

    out = tmp_path_factory.mktemp("vae_run")
    run(compose_config("train", VAE_SHRINK, out))
    return out / "checkpoints" / "last.ckpt"


def assert_same_images(actual, desired, err_msg: str = "") -> None:
    """uint8 images recorded on another machine: equal up to float rounding, which on a CPU of another vector width
    can move a value across a quantisation boundary (seen: 1 of 12,288 values by 1). Any real change moves many
    values: so at most 1 level apart, and at most 0.1 % of the values differ."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape and actual.dtype == desired.dtype, err_msg
    if actual.dtype != np.uint8:  # labels, captions: exact
        np.testing.assert_array_equal(actual, desired, err_msg=err_msg)
        return
    difference = np.abs(actual.astype(np.int16) - desired.astype(np.int16))
    assert difference.max(initial=0) <= 1, f"{err_msg}: values differ by up to {difference.max()} levels"
    assert (difference > 0).mean() <= 1e-3, f"{err_msg}: {(difference > 0).mean():.3%} of the values differ"
