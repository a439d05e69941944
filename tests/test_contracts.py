"""The declared contracts: layers, the conditioner/space/sampler composition, the data interface, registration
of new parts, self-contained and older checkpoints, and every experiment preset."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffexp.checkpoints import CONFIG_KEY, FORMAT
from diffexp.conditioning import ClassConditioner, TextConditioner, Unconditional
from diffexp.objectives import Density, Weighting
from diffexp.paths import GaussianPath
from diffexp.samplers import DDIMSampler
from diffexp.schedules import SCHEDULES, register_schedule
from tests.conftest import ROOT, SHRINK, assert_same_images, compose_config, tiny_hf_folder

SRC = ROOT / "src" / "diffexp"
CORE = ("registry", "schedules", "paths", "diffusion", "objectives", "distillation", "samplers", "guiders", "posthoc",
        "precision", "nets")
APPLICATION = ("train", "sample", "config", "course", "compare", "distributed", "slurm", "loggers", "runinfo",
               "viz.__main__", "export", "build", "fsdp", "app", "api", "ema", "encode_latents", "evaluate",
               "make_shards")
FORBIDDEN_IN_CORE = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torchmetrics", "transformers")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth in the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_layers_point_down_only():
    """Core math imports no framework and no glue; glue never imports the entry points or Hydra."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        ours = {m[len("diffexp."):] for m in imports_of(path) if m.startswith("diffexp.")}
        foreign = {m for m in imports_of(path) if not m.startswith("diffexp")}
        if within(name, CORE):
            problems += [f"core {name} imports {m}" for m in foreign if within(m, FORBIDDEN_IN_CORE)]
            problems += [f"core {name} imports glue diffexp.{m}" for m in ours if not within(m, CORE)]
        elif not within(name, APPLICATION):
            problems += [f"glue {name} imports {m}" for m in foreign if within(m, ("hydra", "omegaconf"))]
            problems += [f"glue {name} imports entry point diffexp.{m}" for m in ours if within(m, APPLICATION)]
    assert not problems, "\n".join(problems)
    assert len(list(SRC.rglob("*.py"))) > 40  # the walk saw the package


def test_the_import_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lightning import Trainer\n    import diffexp.train\n")
    assert {"lightning", "diffexp.train"} <= imports_of(bad)


def test_diffusion_module_does_not_branch_on_kinds():
    source = (SRC / "lit" / "diffusion.py").read_text()
    for kind_check in ("text_encoder", "class_conditional", "isinstance(self.space", "isinstance(self.conditioner",
                       "LatentSpace", "TextConditioner", "ClassConditioner"):
        assert kind_check not in source, kind_check
    train_source = (SRC / "train.py").read_text()
    assert "hasattr(model" not in train_source and "needs_sampling" not in train_source


# --- conditioners ----------------------------------------------------------------------------------------
def test_class_conditioner_null_label_dropout_and_monitoring_labels():
    conditioner = ClassConditioner(num_classes=10, p_uncond=0.25)
    labels = torch.arange(1000) % 10
    kwargs = conditioner.from_batch({"label": labels}, drop=True, generator=torch.Generator().manual_seed(0))
    dropped = kwargs["class_labels"] == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.04
    assert torch.equal(kwargs["class_labels"][~dropped], labels[~dropped]) and torch.equal(labels, torch.arange(1000) % 10)
    assert torch.equal(conditioner.null(3, "cpu")["class_labels"], torch.tensor([10, 10, 10]))
    assert torch.equal(conditioner.for_sampling(torch.tensor([3, 12]))["class_labels"], torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"class_labels must be 2 integers in \[0, 10\)"):
        conditioner.encode({"class_labels": torch.tensor([1, 10])}, 2, "cpu")
    with pytest.raises(ValueError, match="labelled data"):
        ClassConditioner(num_classes=None)


def test_unconditional_and_text_conditioners_reject_what_they_cannot_take():
    from diffexp.guiders import CFG

    net = lambda x, t, **kw: x  # noqa: E731
    guider, path = CFG(2.0), None
    with pytest.raises(ValueError, match="it is unconditional"):
        Unconditional().model_fn(net, 2, {"captions": ["a", "b"]}, guider, path, "epsilon")
    assert Unconditional(p_uncond=0.2).p_uncond == 0.2  # a preset's p_uncond may stay when conditioning=none
    plain = Unconditional().model_fn(net, 2, {}, guider, path, "epsilon")
    x = torch.randn(2, 1, 2, 2)
    assert torch.equal(plain(x, torch.zeros(2)), x) and plain.passes == 1  # the net alone, one pass
    from diffexp.text import LearnedTextEncoder

    text = TextConditioner(LearnedTextEncoder(dim=8, layers=1, heads=2, max_length=4))
    with pytest.raises(ValueError, match="pass 2 captions"):
        text.model_fn(net, 2, {}, guider, path, "epsilon")
    with pytest.raises(ValueError, match=r"takes \['captions'\]"):
        text.model_fn(net, 2, {"class_labels": torch.tensor([0, 1])}, guider, path, "epsilon")
    with pytest.raises(ValueError, match="text_encoder=learned"):
        TextConditioner(None)


# --- data interface: a folder of images with captions ------------------------------------------------------
CAPTIONS = ["a small red circle in the top left", "a large blue square in the center", "a small green diamond"]


def image_folder(root: Path, n: int = 12) -> Path:
    """``n`` random 16x16 PNGs in two subfolders with a metadata.jsonl (file names are never caption words)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = root / f"part{i % 2}" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append({"file_name": f"part{i % 2}/{path.name}", "text": CAPTIONS[i % 3]})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_image_folder_declares_captions_in_item_order(tmp_path):
    from diffexp.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(image_folder(tmp_path / "imgs")), image_size=16, val_fraction=0.25, num_workers=0)
    for split in ("train", "val"):
        dataset, captions = dm.dataset(split), dm.captions(split)
        assert isinstance(captions, list) and len(captions) == len(dataset)
        assert [dataset[i]["caption"] for i in range(len(dataset))] == captions
        assert captions[:2] == captions[:2] and set(captions) <= set(CAPTIONS)
    assert dm.num_classes is None and dm.name == "image_folder"


@pytest.mark.parametrize("encoder", ["learned", "minilm", "clip", "t5"])
def test_image_folder_with_captions_trains_with_every_text_encoder(tmp_path, encoder):
    from diffexp.api import load_model
    from diffexp.train import run

    root = image_folder(tmp_path / "imgs")
    extra = {"learned": ["text_encoder.dim=16", "text_encoder.heads=2"],
             "minilm": [],
             "clip": [f"text_encoder.name_or_path={tiny_hf_folder(tmp_path, 'clip')}", "text_encoder.max_length=8"],
             "t5": [f"text_encoder.name_or_path={tiny_hf_folder(tmp_path, 't5')}", "text_encoder.max_length=8"]}
    overrides = SHRINK + ["data=image_folder", f"data.root={root}", "data.image_size=16", "data.num_workers=0",
                          "data.val_fraction=0.25", "data.batch_size=4", f"text_encoder={encoder}",
                          "net.num_heads=2", "trainer.max_steps=2", "callbacks.sample_grid.n=2", *extra[encoder]]
    run(compose_config("train", overrides, tmp_path / "run"))
    model, cfg = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert set(model.conditioner.example_captions) <= set(CAPTIONS) and model.conditioner.example_captions
    if encoder == "learned":  # the tokenizer learned the caption words, never the file names
        vocab = set(model.conditioner.encoder.vocab)
        assert {"red", "circle", "square", "diamond"} <= vocab and not vocab & {"img", "png", "part0", "000"}
    images = model.sample(2, captions=CAPTIONS[:2], progress=False, sampler=DDIMSampler(model.path, steps=2, prediction_type=model.prediction.sampler_type))
    assert images.shape == (2, 3, 16, 16)


# --- registering a new schedule and sampler: one function/class + one YAML ------------------------------------
def constant_betas(T: int, beta_start: float, beta_end: float, **_) -> torch.Tensor:
    """A schedule defined only here: betas = (beta_start + beta_end) / 2 everywhere."""
    return torch.full((T,), (beta_start + beta_end) / 2, dtype=torch.float64)


class CountingDDIM(DDIMSampler):
    """A sampler defined only here: DDIM that records the timesteps it visits."""

    visited: list = []

    def step(self, denoiser, x_t, t, t_prev, generator=None, state=None):
        CountingDDIM.visited.append(t)
        return super().step(denoiser, x_t, t, t_prev, generator, state)


def test_a_new_schedule_and_sampler_need_one_definition_and_one_yaml(tmp_path, monkeypatch):
    from diffexp.sample import run as sample_run
    from diffexp.train import run

    monkeypatch.setitem(SCHEDULES, "test_constant", SCHEDULES["linear"])  # restored after the test
    register_schedule("test_constant")(constant_betas)
    conf = tmp_path / "my_conf"
    (conf / "schedule").mkdir(parents=True)
    (conf / "sampler").mkdir()
    (conf / "schedule" / "constant.yaml").write_text("defaults:\n  - /schedule_base@_here_\n  - _self_\n\n"
                                                       "name: test_constant\n")
    (conf / "sampler" / "counting.yaml").write_text(f"_target_: {__name__}.CountingDDIM\n_partial_: true\nsteps: 4\n"
                                                    f"progress: false\n")
    searchpath = f"hydra.searchpath=[file://{conf}]"
    cfg = compose_config("train", SHRINK + [searchpath, "formulation=ddpm", "schedule=constant", "trainer.max_steps=2"],
                         tmp_path / "run")
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)[CONFIG_KEY]
    assert saved["schedule"]["name"] == "test_constant" and "test_constant" in SCHEDULES
    CountingDDIM.visited.clear()
    summary = sample_run(compose_config("sample", [searchpath, f"ckpt={ckpt}", "sampler=counting", "n=3",
                                                   f"out={tmp_path / 'samples'}", "progress=false"], tmp_path / "s"))
    assert CountingDDIM.visited == [750, 500, 250, 0] and summary["nfe"] == 4
    assert (tmp_path / "samples" / "grid.png").is_file()


class QuadraticFlowPath(GaussianPath):
    """A path defined only here: alpha = 1 - t^2, sigma = t on [0, 1] (log-SNR 2 log((1 - t^2) / t), decreasing)."""

    default_spacing = "trailing"

    def __init__(self, t_min: float = 0.01, t_max: float = 1.0):
        super().__init__(t_min, t_max)

    def _alpha_sigma(self, t):
        return 1 - t**2, t

    def _time_at_log_snr(self, lam):
        r = torch.exp(lam / 2)  # (1 - t^2) / t = r  ->  t^2 + r t - 1 = 0
        return (torch.sqrt(r**2 + 4) - r) / 2

    def noise_input(self, t):
        return 1000 * t


class UniformLogSNR(Density):
    """A density defined only here: lambda ~ U[low, high], mapped through the path."""

    def __init__(self, low: float = -6.0, high: float = 6.0):
        self.low, self.high = low, high

    def sample(self, n, path, generator, device):
        lam = self.low + (self.high - self.low) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return path.time_at_log_snr(lam, clamp=True)


class SNRPlusOne(Weighting):
    """A weighting defined only here: SNR + 1 on the x0 error."""

    def __call__(self, snr, log_snr, scale):
        return (snr + 1) / scale


def test_a_new_path_sampler_and_objective_need_one_definition_and_one_yaml_each(tmp_path, monkeypatch):
    """A Gaussian path, a sampler, a density and a weighting written outside the package, each registered where it is
    defined and named by a YAML in the user's own config folder, train a model whose checkpoint sample.py rebuilds
    (the registries are the checkpoint allow-list)."""
    from diffexp.objectives import DENSITIES, WEIGHTINGS
    from diffexp.paths import PATHS
    from diffexp.samplers import SAMPLERS
    from diffexp.sample import run as sample_run
    from diffexp.api import load_model
    from diffexp.train import run

    for registry, name, part in [(PATHS, "test_quadratic_flow", QuadraticFlowPath), (SAMPLERS, "test_counting", CountingDDIM),
                                 (DENSITIES, "test_uniform_log_snr", UniformLogSNR), (WEIGHTINGS, "test_snr_plus_one", SNRPlusOne)]:
        monkeypatch.setitem(registry, name, part)  # registered as a decorator would, removed after the test
    conf = tmp_path / "my_conf"
    for group, name, body in [("path", "quadratic_flow", "t_min: 0.02\n"), ("sampler", "counting", "_partial_: true\nsteps: 4\nprogress: false\n"),
                              ("density", "uniform_log_snr", "low: -5.0\nhigh: 5.0\n"), ("weighting", "snr_plus_one", "")]:
        cls = {"path": QuadraticFlowPath, "sampler": CountingDDIM, "density": UniformLogSNR, "weighting": SNRPlusOne}[group]
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{name}.yaml").write_text(f"_target_: {__name__}.{cls.__name__}\n{body}")
    searchpath = f"hydra.searchpath=[file://{conf}]"
    overrides = [searchpath, "path=quadratic_flow", "density=uniform_log_snr", "weighting=snr_plus_one",
                 "model.prediction_type=velocity", "model.min_snr_gamma=null", "trainer.max_steps=2"]
    run(compose_config("train", SHRINK + overrides, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model, _ = load_model(ckpt)
    assert isinstance(model.path, QuadraticFlowPath) and model.path.t_min == 0.02
    assert isinstance(model.objective.density, UniformLogSNR) and isinstance(model.objective.weighting, SNRPlusOne)
    CountingDDIM.visited.clear()
    summary = sample_run(compose_config("sample", [searchpath, f"ckpt={ckpt}", "sampler=counting", "n=3",
                                                   f"out={tmp_path / 'samples'}", "progress=false"], tmp_path / "s"))
    assert CountingDDIM.visited == [1.0, 0.75, 0.5, 0.25] and summary["nfe"] == 4  # the path's trailing spacing
    monkeypatch.delitem(PATHS, "test_quadratic_flow")
    from diffexp.checkpoints import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError, match="QuadraticFlowPath"):  # unregistered: refused, never built
        load_model(ckpt)


# --- class conditioning end to end ---------------------------------------------------------------------------
def test_class_conditional_training_and_sampling(tmp_path):
    from diffexp.api import load_model
    from diffexp.sample import run as sample_run
    from diffexp.train import run

    cfg = compose_config("train", SHRINK + ["text_encoder=class"], tmp_path / "run")
    assert cfg.conditioning._target_.endswith("ClassConditioner") and cfg.conditioning.num_classes is None
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)[CONFIG_KEY]
    assert saved["conditioning"]["num_classes"] == 10 == saved["net"]["num_classes"]  # from the data, written on purpose
    model, _ = load_model(ckpt)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = DDIMSampler(model.path, steps=3, prediction_type=model.prediction.sampler_type, progress=False)
    labels = torch.tensor([0, 1, 2, 3])
    guided = model.sample(4, sampler=sampler, x_T=noise, class_labels=labels, guidance_scale=3.0)
    plain = model.sample(4, sampler=sampler, x_T=noise, class_labels=labels, guidance_scale=1.0)
    assert guided.shape == (4, 1, 16, 16) and not torch.equal(guided, plain)
    summary = sample_run(compose_config("sample", [f"ckpt={ckpt}", "n=12", "sampler.steps=2", "progress=false",
                                                   f"out={tmp_path / 'samples'}", "guidance_scale=2"], tmp_path / "s"))
    saved = np.load(tmp_path / "samples" / "samples.npz")
    assert list(saved["labels"]) == [i % 10 for i in range(12)] and summary["guidance_scale"] == 2
    with pytest.raises(ValueError, match="not text-conditioned"):
        sample_run(compose_config("sample", [f"ckpt={ckpt}", "prompt=a two", f"out={tmp_path / 'p'}"], tmp_path / "p"))


def test_class_conditioning_needs_labelled_data(tmp_path):
    from diffexp.train import build

    cfg = compose_config("train", SHRINK + ["data=image_folder", f"data.root={image_folder(tmp_path / 'imgs')}",
                                            "data.image_size=16", "text_encoder=class"], tmp_path / "run")
    with pytest.raises(ValueError, match="labelled data"):
        build(cfg)


# --- the swept metric --------------------------------------------------------------------------------------
def test_a_metric_never_logged_is_an_error_in_a_sweep_and_a_warning_in_a_run(tmp_path):
    from diffexp.train import optimized_value, run

    cfg = compose_config("train", SHRINK + ["trainer.max_steps=2", "optimized_metric=val/fid_digits"], tmp_path / "run")
    with pytest.warns(UserWarning, match=r"optimized_metric='val/fid_digits' was never logged.*val/loss"):
        assert run(cfg) is None
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # the run itself is kept
    with pytest.raises(ValueError, match=r"never logged by this run; logged: \['val/loss'\]"):
        optimized_value("val/fid_digits", {"val/loss": 0.5}, sweep=True)
    assert optimized_value("val/loss", {"val/loss": 0.5}, sweep=True) == 0.5


# --- checkpoints written before this layout (format 1, by commit 49910cd) -------------------------------------
FORMAT1 = ROOT / "tests" / "data" / "format1"


def format1_checkpoint(name: str, tmp_path: Path) -> Path:
    """A copy of a format-1 checkpoint; the latent one names its VAE file (format 1 did not carry it)."""
    path = tmp_path / f"{name}.ckpt"
    if name == "latent":
        checkpoint = torch.load(FORMAT1 / "latent.ckpt", map_location="cpu", weights_only=False)
        shutil.copy(FORMAT1 / "vae.ckpt", tmp_path / "vae.ckpt")
        checkpoint[CONFIG_KEY]["vae"]["ckpt"] = str(tmp_path / "vae.ckpt")
        torch.save(checkpoint, path)
    else:
        shutil.copy(FORMAT1 / f"{name}.ckpt", path)
    return path


@pytest.mark.parametrize("name,ckpt,extra", [("class", "class", []), ("text", "text", ["prompt=a red circle",
                                                                                       "guidance_scale=2"]),
                                             ("text_ex", "text", []), ("latent", "latent", [])])
def test_format1_checkpoints_sample_exactly_as_before(tmp_path, name, ckpt, extra):
    """sample.py on checkpoints written by the code before this layout gives the images that code gave (to float
    rounding: assert_same_images)."""
    from diffexp.sample import run as sample_run

    path = format1_checkpoint(ckpt, tmp_path)
    out = tmp_path / "out"
    sample_run(compose_config("sample", [f"ckpt={path}", "n=4", "seed=0", "sampler.steps=5", "progress=false",
                                         "device=cpu", f"out={out}", *extra], tmp_path / "s"))
    before, now = np.load(FORMAT1 / f"{name}_samples.npz"), np.load(out / "samples.npz")
    assert sorted(before.files) == sorted(now.files)
    for key in before.files:
        assert_same_images(now[key], before[key], key)


def test_format1_checkpoint_resumes(tmp_path):
    """Resuming (ckpt_path=) from a format-1 text checkpoint: its tokenizer, captions and EMA carry over."""
    from diffexp.api import load_model
    from diffexp.train import run

    path = format1_checkpoint("text", tmp_path)
    old = torch.load(path, map_location="cpu", weights_only=False)
    overrides = SHRINK + ["experiment=shapes_text2img", "data.num_train=32", "data.num_val=8", "text_encoder.dim=16",
                          "text_encoder.heads=2", "net.num_heads=2", "net.base_channels=8", "net.channel_mult=[1,2]",
                          "trainer.max_steps=4", f"ckpt_path={path}", "callbacks.sample_grid.n=2"]
    run(compose_config("train", overrides, tmp_path / "resumed"))
    resumed = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    new = torch.load(resumed, map_location="cpu", weights_only=False)
    assert new["global_step"] == 4 and new["diffexp_format"] == FORMAT
    model, _ = load_model(resumed)
    assert model.conditioner.example_captions == old["diffexp_example_captions"]
    assert model.conditioner.encoder.vocab == old["state_dict"]["text_encoder._extra_state"]["vocab"]


# --- every experiment preset ---------------------------------------------------------------------------------
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
PRESET_DATA = ["++data.num_train=32", "++data.num_val=8"]  # shapes presets; digits ignores them (++ adds, unused)


def preset_overrides(preset: str, vae_ckpt: Path | None = None, tmp_path: Path | None = None) -> list[str]:
    """Overrides that train ``preset`` for two steps offline; a preset of hub weights (imagenet256_dit_xl2) runs
    on a small random pipeline of the same layout and a folder of two labelled classes under ``tmp_path``."""
    if preset == "imagenet256_dit_xl2":
        from tests.test_dit import small_xl2_pipeline

        _, small = small_xl2_pipeline(tmp_path)
        for i in range(16):
            folder = tmp_path / "imagenet" / ("207" if i % 2 else "981")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 16 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        return [f"experiment={preset}", *SHRINK, "trainer.max_steps=2", "trainer.precision=32-true",
                "callbacks.sample_grid.n=2", *small, f"data.root={tmp_path / 'imagenet'}", "data.labels=folder_ids",
                "data.num_workers=0"]
    if preset == "shapes_vae":
        return ["experiment=shapes_vae", "trainer.max_steps=2", "eval_every=2",
                "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                "data.batch_size=8", "data.num_train=32", "data.num_val=8"]
    extra = [f"vae.ckpt={vae_ckpt or '/no/vae.ckpt'}"] if "latent" in preset else []
    shapes = PRESET_DATA if preset.startswith("shapes") else []
    return [f"experiment={preset}", *SHRINK, "trainer.max_steps=2", "trainer.precision=32-true",
            "callbacks.sample_grid.n=2", *shapes, *extra]


def test_there_are_presets():
    assert {"quickstart", "shapes_text2img", "shapes_latent", "shapes_vae"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(tmp_path, preset):
    from omegaconf import OmegaConf

    cfg = compose_config("train", [f"experiment={preset}"] + (["vae.ckpt=/no/vae.ckpt"] if "latent" in preset else []),
                         tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["_target_"] in ("diffexp.lit.DiffusionModel", "diffexp.lit.VAETraining")
    every = {name: c.get("every_n_steps", c.get("every_n_train_steps")) for name, c in resolved["callbacks"].items()
             if isinstance(c, dict) and ("every_n_steps" in c or "every_n_train_steps" in c)}
    assert every and set(every.values()) == {resolved["eval_every"]}  # one number sets every periodic callback


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_two_steps_and_samples(tmp_path, preset, vae_ckpt, monkeypatch):
    from diffexp.autoencoders import OwnAutoencoder
    from diffexp.sample import run as sample_run
    from diffexp.train import run

    monkeypatch.setenv("DIFFEXP_CACHE", str(tmp_path / "cache"))
    run(compose_config("train", preset_overrides(preset, vae_ckpt, tmp_path), tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if preset == "shapes_vae":
        net = OwnAutoencoder(str(ckpt)).net
        assert net(torch.zeros(1, 3, 32, 32), sample_posterior=False)[0].shape == (1, 3, 32, 32)
        return
    out = tmp_path / "samples"
    summary = sample_run(compose_config("sample", [f"ckpt={ckpt}", "n=2", "sampler.steps=2", "progress=false",
                                                   f"out={out}"], tmp_path / "s"))
    assert (out / "grid.png").is_file() and summary["n"] == 2


# --- user errors the restructuring touches ---------------------------------------------------------------------
def test_image_folder_captions_follow_relative_paths(tmp_path):
    """The same file name in two subfolders gets each its own caption (metadata file_name is a relative path)."""
    from diffexp.data import ImageFolderDataModule

    root = tmp_path / "imgs"
    rows = []
    for folder, text in (("a", "a red circle"), ("b", "a blue square")):
        for i in range(4):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / folder / f"img{i}.png")
            rows.append({"file_name": f"{folder}/img{i}.png", "text": text})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = ImageFolderDataModule(str(root), image_size=8, val_fraction=0.25, num_workers=0)
    for split in ("train", "val"):
        dataset = dm.dataset(split)
        for i in range(len(dataset)):
            expected = "a red circle" if dataset.files[i].parent.name == "a" else "a blue square"
            assert dm.captions(split)[i] == expected


def test_image_folder_labels_come_from_class_folders(tmp_path):
    """data.labels=folders numbers the top-level folders in sorted order (torchvision's ImageFolder), folder_ids
    reads their names as labels; bad folders, loose images and bad options are clear errors, and
    conditioning=class refuses unlabelled data or more classes than the model has."""
    from torchvision.datasets import ImageFolder

    from diffexp.conditioning import ClassConditioner
    from diffexp.data import ImageFolderDataModule

    root = tmp_path / "imgs"
    for name, n in (("n02099601", 3), ("n01440764", 2), ("n09999999", 3)):
        (root / name / "deep").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(root / name / ("deep" if i else "") / f"{i}.png")

    def module(folder=root, **kw):
        return ImageFolderDataModule(str(folder), image_size=8, val_fraction=0.25, num_workers=0, **kw)

    dm = module(labels="folders")
    assert dm.num_classes == 3 and module().num_classes is None
    reference = ImageFolder(str(root))  # torchvision: path -> class index of its top-level folder
    expected = {Path(path).relative_to(root): label for path, label in reference.samples}
    for split in ("train", "val"):
        data = dm.dataset(split)
        assert data.files and [data[i]["label"] for i in range(len(data))] == \
            [expected[f.relative_to(root)] for f in data.files]

    ids = tmp_path / "ids"
    for name in ("207", "981"):
        (ids / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(ids / name / f"{i}.png")
    by_id = module(ids, labels="folder_ids")
    assert by_id.num_classes == 982
    labels = {f.parent.name: by_id.dataset("train")[i]["label"] for i, f in enumerate(by_id.dataset("train").files)}
    assert all(int(name) == label for name, label in labels.items())

    with pytest.raises(ValueError, match=r"data.labels='yes'; allowed: null \(unlabelled\), folders, folder_ids"):
        module(labels="yes")
    with pytest.raises(ValueError, match=r"folder_ids: folder names must be class numbers.*n01440764"):
        module(labels="folder_ids").setup()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "loose.png")
    with pytest.raises(ValueError, match=r"1 images lie directly in data.root=.*loose.png.*outside any class folder"):
        module(labels="folders").setup()
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(FileNotFoundError, match="has no folders"):
        module(flat, labels="folders").num_classes

    with pytest.raises(ValueError, match=r"conditioning=class needs labelled data.*data.labels=folders"):
        ClassConditioner(1000).fit(module())
    with pytest.raises(ValueError, match=r"conditioning=class needs labelled data.*got num_classes=None.*data.labels="
                                         r"folders makes each top-level folder a class"):
        ClassConditioner(None)  # num_classes: null in the config, and the data has none
    with pytest.raises(ValueError, match=r"labels up to 981, but the model has conditioning.num_classes=10; set "
                                         r"conditioning.num_classes >= 982"):
        ClassConditioner(10).fit(by_id)
    ClassConditioner(1000).fit(by_id)


def test_sample_py_clear_errors(tmp_path, vae_ckpt, tiny_checkpoint):
    from diffexp.sample import run as sample_run

    def sample(*overrides):
        return sample_run(compose_config("sample", [*overrides, f"out={tmp_path / 'out'}", "progress=false"],
                                         tmp_path / "s"))

    with pytest.raises(ValueError, match="not a diffusion model"):
        sample(f"ckpt={vae_ckpt}", "n=2")
    with pytest.raises(ValueError, match="n must be a positive number"):
        sample(f"ckpt={tiny_checkpoint}", "n=-3")
    old_latent = torch.load(FORMAT1 / "latent.ckpt", map_location="cpu", weights_only=False)
    old_latent[CONFIG_KEY]["vae"]["ckpt"] = str(tmp_path / "moved" / "vae.ckpt")
    torch.save(old_latent, tmp_path / "latent.ckpt")
    with pytest.raises(FileNotFoundError, match="written before checkpoints carried their VAE"):
        sample(f"ckpt={tmp_path / 'latent.ckpt'}", "n=2")


def test_train_clear_errors(train_cfg):
    from diffexp.train import build

    with pytest.raises(ValueError, match="eval_every must be a positive"):
        build(train_cfg("eval_every=0"))
    with pytest.raises(ValueError, match="conditioning.p_uncond must lie in"):
        build(train_cfg("conditioning.p_uncond=2"))
    with pytest.raises(ValueError, match="use conditioning=text"):
        build(train_cfg("text_encoder=learned", "conditioning=none"))
    with pytest.raises(ValueError, match="cache_latents=true pre-encodes"):
        build(train_cfg("cache_latents=true"))
