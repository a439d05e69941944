"""The diffexp playground: a local web page (Gradio) to play with the forward process, samplers and guidance.

    pip install -e ".[app]"
    python -m diffexp.app                         # http://127.0.0.1:7860, the shipped course models
    python -m diffexp.app --ckpt logs/train/latest/checkpoints/last.ckpt --port 7861

Three tabs, offline and on the CPU:
- Forward process: a dataset image (or an upload), a formulation's path (DDPM with a schedule and its parameters:
  T, beta range, cosine s, zero-terminal SNR; or the cosine VP, EDM or flow path) and t: the noised image, its pixel
  histogram against N(0, 1), alpha and log-SNR curves, and the same image and noise along every path at once.
- Sampling: a checkpoint (shipped, a file, or a run directory), sampler, steps, seed, prompt and guidance scale;
  x_t and the predicted x_0 fill in step by step, then the final grid (the grid ``sample.py`` writes for the
  same checkpoint, sampler, steps and seed: ``grid_scale=2``).
- Compare: two samplers from the same noise, or two schedules noising the same image.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from diffexp.images import make_grid, save_grid

DATASETS = ("digits", "shapes")
GRID_SCALE = 2  # sample.py's default grid_scale: the final grid is the file sample.py writes
VIEW_PIXELS = 256  # live views are upscaled (nearest) to about this width
# the forward tab's formulations: DDPM's path is the schedule the controls describe; the others are the paths
# formulation=vp|edm|flow train on (diffexp.paths), each at the same fraction of its own clock
PATH_CHOICES = ("ddpm", "vp", "edm", "flow")
SAMPLERS = ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "edm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc")


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an H x W (x C) uint8 image, so small images stay crisp in the browser."""
    return array.repeat(factor, axis=0).repeat(factor, axis=1)


def as_view(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    grid = make_grid(images.clamp(-1, 1), nrow)
    return upscale(grid, max(1, VIEW_PIXELS // grid.shape[1]))


# ---------------------------------------------------------------------------------------------- forward process
@lru_cache(maxsize=4)
def dataset_images(dataset: str) -> torch.Tensor:
    """Up to 64 images of ``dataset`` in [-1, 1]: the digits validation split, or shapes drawn with seed 0."""
    if dataset == "digits":
        from diffexp.data import DigitsDataModule

        data = DigitsDataModule(image_size=16, batch_size=64)
        data.setup("fit")
        return torch.stack([data.val_set[i]["image"] for i in range(min(64, len(data.val_set)))])
    if dataset == "shapes":
        from diffexp.data.shapes import make_shapes

        return make_shapes(64, seed=0)[0]
    raise ValueError(f"dataset {dataset!r}; allowed: {list(DATASETS)}")


def image_of(dataset: str, index: int, upload: np.ndarray | None) -> torch.Tensor:
    """The chosen image (C, H, W) in [-1, 1]: an upload (resized to 32 x 32) or ``dataset``'s image ``index``."""
    if upload is not None:
        from PIL import Image

        array = np.asarray(upload)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
            raise ValueError(f"the upload must be an H x W (grey) or H x W x 3/4 (colour) image, got shape {array.shape}")
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255  # a float image in [0, 1]
        pil = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB").resize((32, 32), Image.BICUBIC)
        return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 127.5 - 1
    images = dataset_images(dataset)
    return images[int(index) % len(images)]


def make_schedule(name: str, num_timesteps, beta_start, beta_end, cosine_s, zero_terminal_snr: bool):
    """The schedule the controls describe (diffexp.schedules.get_schedule); its errors name the parameter."""
    from diffexp.schedules import get_schedule

    return get_schedule(name, int(num_timesteps), float(beta_start), float(beta_end), float(cosine_s),
                        rescale_zero_terminal_snr=bool(zero_terminal_snr))


def noised_view(image: torch.Tensor, schedule, t: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(x_t as a displayable image, x_t) for one image, the noise drawn from ``seed`` (the same for every t)."""
    from diffexp.viz.forward import noised

    t = min(int(t), schedule.num_timesteps - 1)
    x_t = noised(image, schedule, [t], seed)[0]
    return as_view(x_t[None]), x_t


def histogram_plot(x_t: torch.Tensor, t, abar: float, label: str = "pixels of x_t"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    grid = np.linspace(-4, 4, 200)
    ax.hist(x_t.flatten().numpy(), bins=40, range=(-4, 4), density=True, alpha=0.7, label=label)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), color="black", lw=1, label="N(0, 1)")
    ax.set_title(f"t = {t:g}, alpha^2 = {abar:.4f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def curve_pair_plot(curves: dict, titles: tuple[str, str], marker: float, xlabel: str):
    """Two panels of curves {label: (x, left values, right values)} with x = ``marker`` marked in red."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.6))
    for label, (x, left, right) in curves.items():
        axes[0].plot(x, left, label=label)
        axes[1].plot(x, right, label=label)
    for ax, title in zip(axes, titles):
        ax.axvline(marker, color="red", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def curves_plot(schedules: dict, t: int):
    """alpha-bar and log-SNR of each schedule against t, with the chosen t marked."""
    curves = {label: (np.arange(s.num_timesteps), s.alphas_cumprod.numpy(), s.log_snr.numpy())
              for label, s in schedules.items()}
    return curve_pair_plot(curves, ("alpha-bar", "log SNR"), t, "t")


def formulation_paths(schedule) -> dict:
    """{name: Gaussian path} of the forward tab: DDPM's discrete path of ``schedule``, the cosine VP, EDM and flow."""
    from diffexp.paths import CosinePath, DiscretePath, EDMPath, FlowPath

    return {"ddpm": DiscretePath(schedule), "vp": CosinePath(), "edm": EDMPath(), "flow": FlowPath()}


def path_noised(image: torch.Tensor, path, fraction: float, seed: int = 0) -> tuple[float, torch.Tensor]:
    """(time, x_t) of one image ``fraction`` of the way along ``path``'s clock (:func:`diffexp.paths.time_at_fraction`),
    with the noise the DDPM view draws from ``seed``, so every path noises the same image with the same noise."""
    from diffexp.paths import time_at_fraction

    time = time_at_fraction(path, fraction)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    return time, path.noised(image.float()[None], time, noise[None])[0]


def unit_scaled(path, time: float, x_t: torch.Tensor) -> torch.Tensor:
    """x_t / sqrt(alpha^2 + sigma^2): every path's x_t at unit scale for display (EDM's grows to sigma = 80)."""
    alpha, sigma = path.alpha_sigma(time)
    return x_t / (alpha**2 + sigma**2) ** 0.5


def paths_plot(image: torch.Tensor, schedule, fraction: float, chosen: str = "ddpm"):
    """The same image and noise along every path of :func:`formulation_paths`, at the same fraction of each clock,
    shown at unit scale with each time and log-SNR (the chosen path's title in red)."""
    import matplotlib.pyplot as plt

    paths = formulation_paths(schedule)
    fig, axes = plt.subplots(1, len(paths), figsize=(7.5, 2.3))
    for ax, (name, path) in zip(axes, paths.items()):
        time, x_t = path_noised(image, path, fraction)
        view = make_grid(unit_scaled(path, time, x_t).clamp(-1, 1)[None])
        ax.imshow(view.squeeze(), cmap="gray" if view.ndim == 2 or view.shape[-1] == 1 else None)
        lam = path.log_snr(torch.tensor([time], dtype=torch.float64)).item()
        ax.set_title(f"{name}: t = {time:.3g}\nlog-SNR {lam:.2f}", fontsize=8, color="red" if name == chosen else "black")
        ax.axis("off")
    fig.suptitle(f"the same image and noise, {fraction:.1%} of the way along each path", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def path_curves_plot(schedule, fraction: float):
    """alpha and log-SNR of every path of :func:`formulation_paths` against the fraction of its clock, the chosen
    fraction marked."""
    from diffexp.paths import time_at_fraction

    fractions = np.linspace(0, 1, 201)
    curves = {}
    for name, path in formulation_paths(schedule).items():
        times = torch.tensor([time_at_fraction(path, f) for f in fractions], dtype=torch.float64)
        alpha, _ = path.coefficients(times, times)
        curves[name] = (fractions, alpha.numpy(), path.log_snr(times).clamp(-20, 20).numpy())
    return curve_pair_plot(curves, ("alpha", "log SNR"), fraction, "fraction of the path's clock")


def number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    """A control's value as a number in [low, high]; a clear error for an emptied field or one out of range."""
    if value is None or value == "":
        raise ValueError(f"{name} is empty: enter a number")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"lie in [{low:g}, {high:g}]" if low is not None and high is not None
                  else f"be at least {low:g}" if low is not None else f"be at most {high:g}")
        raise ValueError(f"{name}={value:g} must {bounds}")
    return value


def counts(steps, seed, n) -> tuple[int, int, int]:
    """The sampling tab's integers, checked: steps >= 1, 0 <= seed < 2^63, n >= 1."""
    return (int(number(steps, "steps", 1, 10_000)), int(number(seed, "seed", 0, 2**63 - 1)),
            int(number(n, "images", 1, 1024)))


def forward_process(*controls):
    """Tab 1: (noised image, histogram, curves, every path at once) for the controls' values."""
    return checked(forward_views, *controls)


def forward_views(dataset, index, upload, name, num_timesteps, beta_start, beta_end, cosine_s, ztsnr, t,
                  formulation="ddpm"):
    """DDPM (``formulation=ddpm``): x_t of the schedule the controls describe at timestep t. Another formulation:
    x_t of its path at the same fraction t / (T - 1) of its own clock (shown at unit scale). Both with the
    same noise, and the strip of all paths at that fraction."""
    index, t = int(number(index, "image")), int(number(t, "t", 0))  # t past T - 1: the last timestep
    T = number(num_timesteps, "T")
    if not T.is_integer():
        raise ValueError(f"T={T:g} must be a whole number of steps")
    if formulation not in PATH_CHOICES:
        raise ValueError(f"formulation={formulation!r}; allowed: {list(PATH_CHOICES)}")
    schedule = make_schedule(name, int(T), number(beta_start, "beta start"), number(beta_end, "beta end"),
                             number(cosine_s, "cosine s"), ztsnr)
    t = min(t, schedule.num_timesteps - 1)
    image = image_of(dataset, index, upload)
    fraction = t / (schedule.num_timesteps - 1)
    strip = paths_plot(image, schedule, fraction, formulation)
    if formulation == "ddpm":
        view, x_t = noised_view(image, schedule, t)
        return (view, histogram_plot(x_t, t, schedule.alphas_cumprod[t].item()),
                curves_plot({schedule.name: schedule}, t), strip)
    path = formulation_paths(schedule)[formulation]
    time, x_t = path_noised(image, path, fraction)
    shown = unit_scaled(path, time, x_t)
    alpha, sigma = path.alpha_sigma(time)
    return (as_view(shown[None]), histogram_plot(shown, time, alpha**2 / (alpha**2 + sigma**2), "pixels of x_t at unit scale"),
            path_curves_plot(schedule, fraction), strip)


def compare_schedules(dataset, index, upload, name_a, name_b, fraction):
    """Compare tab: the same image and noise at the same fraction of T under two schedules (default parameters)."""
    from diffexp.schedules import get_schedule

    image = image_of(dataset, index, upload)
    schedules = {name: get_schedule(name) for name in (name_a, name_b)}
    t = int(round(float(fraction) * 999))
    views = [noised_view(image, s, t)[0] for s in schedules.values()]
    return views[0], views[1], curves_plot(schedules, t)


# ---------------------------------------------------------------------------------------------------- sampling
def checkpoint_choices(extra: list[str] = ()) -> list[str]:
    from diffexp.pretrained import available

    return [name for name in available() if name != "shapes_vae"] + [str(p) for p in extra]


def resolve_checkpoint(choice: str) -> Path:
    """A shipped model's name, a checkpoint file, or a run directory (its checkpoints/last.ckpt or model.safetensors)."""
    from diffexp.pretrained import MODELS, path

    choice = (choice or "").strip()
    if not choice:
        raise ValueError(f"choose a checkpoint: a shipped model ({checkpoint_choices()}), a file or a run directory")
    if choice in MODELS:
        return path(choice)
    candidate = Path(choice).expanduser()
    if candidate.is_dir():
        for inside in ("checkpoints/last.ckpt", "checkpoints/model.safetensors", "model.safetensors"):
            if (candidate / inside).is_file():
                return candidate / inside
        raise FileNotFoundError(f"checkpoint {choice!r} is a folder without checkpoints/last.ckpt or model.safetensors")
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"checkpoint {choice!r} is neither a shipped model ({checkpoint_choices()}) nor a file "
                            f"or run directory")


@lru_cache(maxsize=4)
def load_checkpoint(path: str):
    from diffexp.api import load_model

    return load_model(path)[0]


def default_guidance(choice):
    """The guidance slider's value for a checkpoint: the model's own default (what sample.py uses)."""
    import gradio as gr

    try:
        return gr.update(value=float(load_checkpoint(str(resolve_checkpoint(choice))).guidance_scale))
    except (ValueError, FileNotFoundError, TypeError):
        return gr.update()


def build_sampler(model, name: str, steps: int):
    """The sampler sample.py builds for ``sampler=NAME sampler.steps=STEPS`` (conf/sampler/NAME.yaml)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffexp.config import CONF_DIR

    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}; allowed: {list(SAMPLERS)}")
    cfg = OmegaConf.load(CONF_DIR / "sampler" / f"{name}.yaml")
    cfg.steps, cfg.progress = int(steps), False
    return model.make_sampler(instantiate(cfg))


def conditions_for(model, n: int, prompt: str | None) -> dict:
    from diffexp.api import sampling_conditions

    prompt = (prompt or "").strip()
    if prompt and "captions" not in model.conditioner.keys:
        raise ValueError("this checkpoint is not text-conditioned: leave the prompt empty")
    return sampling_conditions(model, [prompt] * n if prompt else None, n)


def sample_images(model, sampler, n: int, seed: int, conditions: dict, guidance: float | None, observe=None,
                  guider=None):
    """``n`` samples drawn as sample.py draws them (:func:`diffexp.api.draw_samples`, one batch)."""
    from diffexp.api import draw_samples

    return draw_samples(model, int(n), sampler, int(seed), batch_size=int(n), conditions=conditions, progress=False,
                        guidance_scale=guidance, observe=observe, guider=guider)


GUIDER_CHOICES = ("cfg", "interval", "apg", "cfgpp", "auto")


def build_guider(model, name: str | None, guidance, guide_ckpt: str | None):
    """The guider of the sampling controls: ``name`` at the guidance slider's value (CFG++: its lambda in [0, 1]);
    ``auto`` guided by ``guide_ckpt`` (shipped name, file or run directory). None for plain CFG."""
    from diffexp.api import make_guider

    name = name or "cfg"
    if name not in GUIDER_CHOICES:
        raise ValueError(f"guider {name!r}; choose one of {list(GUIDER_CHOICES)}")
    if name == "cfg":
        return None
    if name == "auto":
        if not (guide_ckpt or "").strip():
            raise ValueError("guider auto needs a guide checkpoint (a weaker model of the same task)")
        return make_guider("auto", model, scale=number(guidance, "guidance scale", 0, 100),
                           guide_ckpt=str(resolve_checkpoint(guide_ckpt.strip())))
    if name == "cfgpp":
        return make_guider("cfgpp", model, scale=number(guidance, "guidance scale (CFG++'s lambda)", 0, 1))
    return make_guider(name, model, scale=None if guidance is None else number(guidance, "guidance scale", 0, 100))


def grid_file(images: torch.Tensor, name: str = "grid.png") -> str:
    directory = Path(tempfile.mkdtemp(prefix="diffexp-app-"))
    return str(save_grid(images, directory / name, scale=GRID_SCALE))


def sampling_stream(choice, sampler_name, steps, seed, n, prompt, guidance, guider_name="cfg", guide_ckpt=None):
    """Sampling tab: yields (x_t view, predicted x_0 view, final grid file, status) as the sampler runs."""
    import gradio as gr

    model = checked(lambda: load_checkpoint(str(resolve_checkpoint(choice))))
    steps, seed, n = checked(counts, steps, seed, n)
    sampler = checked(build_sampler, model, sampler_name, steps)
    conditions = checked(conditions_for, model, n, prompt)
    guider = checked(build_guider, model, guider_name, guidance, guide_ckpt)
    guidance = checked(number, guidance, "guidance scale", 0, 100) \
        if guider is None and ("captions" in model.conditioner.keys or "class_labels" in model.conditioner.keys) \
        else None
    updates: queue.Queue = queue.Queue()
    result: dict = {}

    def observe(i, t, x_t, x0):
        updates.put((i, t, x_t.detach().cpu(), x0.detach().cpu()))

    def run():
        try:
            result["images"] = sample_images(model, sampler, n, seed, conditions, guidance, observe, guider)
        except Exception as e:  # shown in the page
            result["error"] = e
        finally:
            updates.put(None)

    threading.Thread(target=run, daemon=True).start()
    total = len(sampler.timesteps)
    while (item := updates.get()) is not None:
        i, t, x_t, x0 = item
        yield as_view(x_t), as_view(x0), gr.update(), f"step {i + 1} / {total}: t = {t}"
    if "error" in result:
        raise gr.Error(str(result["error"]))
    images = result["images"]
    yield gr.update(), gr.update(), grid_file(images), (f"done: {len(images)} images, {sampler_name}, {int(steps)} steps, "
                                                         f"guider {guider_name or 'cfg'}, "
                                                         f"{model.last_net_passes} net passes per image, "
                                                         f"seed {int(seed)} (the grid sample.py writes)")


def compare_samplers(choice, sampler_a, steps_a, sampler_b, steps_b, seed, n, prompt, guidance, guider_name="cfg",
                     guide_ckpt=None):
    """Compare tab: two samplers from the same noise (the same seed), under the sampling tab's guider."""
    model = checked(lambda: load_checkpoint(str(resolve_checkpoint(choice))))
    steps_a, seed, n = checked(counts, steps_a, seed, n)
    steps_b = checked(counts, steps_b, seed, n)[0]
    conditions = checked(conditions_for, model, n, prompt)
    guider = checked(build_guider, model, guider_name, guidance, guide_ckpt)
    guidance = checked(number, guidance, "guidance scale", 0, 100) \
        if guider is None and ("captions" in model.conditioner.keys or "class_labels" in model.conditioner.keys) \
        else None
    grids = []
    for name, steps in ((sampler_a, steps_a), (sampler_b, steps_b)):
        sampler = checked(build_sampler, model, name, steps)
        grids.append(grid_file(checked(sample_images, model, sampler, n, seed, conditions, guidance, None, guider),
                               f"{name}.png"))
    return grids[0], grids[1]


def checked(function, *args):
    """``function(*args)``; a bad value becomes a message in the page (gr.Error) instead of a stack trace."""
    import gradio as gr

    try:
        return function(*args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise gr.Error(str(e)) from None


# -------------------------------------------------------------------------------------------------------- page
def build_app(extra_checkpoints: list[str] = ()):
    """The Gradio Blocks page."""
    import gradio as gr

    from diffexp.schedules import SCHEDULES

    schedules = list(SCHEDULES)
    checkpoints = checkpoint_choices(extra_checkpoints)
    with gr.Blocks(title="diffexp playground", analytics_enabled=False) as app:
        gr.Markdown("# diffexp playground\nThe forward process, samplers and guidance of diffexp's models, live.")
        with gr.Tab("Forward process"):
            with gr.Row():
                with gr.Column(scale=1):
                    dataset = gr.Radio(list(DATASETS), value="digits", label="dataset", elem_id="fwd-dataset")
                    index = gr.Slider(0, 63, value=0, step=1, label="image", elem_id="fwd-index")
                    upload = gr.Image(label="or upload an image", type="numpy", sources=["upload"], height=140)
                    schedule = gr.Radio(schedules, value="linear", label="schedule", elem_id="fwd-schedule")
                    num_timesteps = gr.Number(1000, label="T", precision=0, elem_id="fwd-T")
                    with gr.Row():
                        beta_start = gr.Number(1e-4, label="beta start", elem_id="fwd-beta-start")
                        beta_end = gr.Number(0.02, label="beta end", elem_id="fwd-beta-end")
                    cosine_s = gr.Number(0.008, label="cosine s", elem_id="fwd-cosine-s")
                    ztsnr = gr.Checkbox(False, label="zero-terminal SNR (Lin et al. 2023)", elem_id="fwd-ztsnr")
                    t = gr.Slider(0, 999, value=250, step=1, label="t", elem_id="fwd-t")
                    formulation = gr.Radio(list(PATH_CHOICES), value="ddpm", elem_id="fwd-path",
                                           label="formulation's path (ddpm: the schedule above; vp, edm, flow: at "
                                                 "t / (T - 1) of their own clock)")
                with gr.Column(scale=2):
                    noised_image = gr.Image(label="x_t", format="png", height=260, elem_id="fwd-image")
                    histogram = gr.Plot(label="pixel histogram", elem_id="fwd-hist")
                    curves = gr.Plot(label="schedule", elem_id="fwd-curves")
                    strip = gr.Plot(label="every path", elem_id="fwd-paths")
            inputs = [dataset, index, upload, schedule, num_timesteps, beta_start, beta_end, cosine_s, ztsnr, t,
                      formulation]
            outputs = [noised_image, histogram, curves, strip]
            for control in inputs:
                control.change(forward_process, inputs, outputs)
            app.load(forward_process, inputs, outputs)

        with gr.Tab("Sampling"):
            with gr.Row():
                with gr.Column(scale=1):
                    ckpt = gr.Dropdown(checkpoints, value=checkpoints[0] if checkpoints else None, allow_custom_value=True,
                                       label="checkpoint (shipped, file or run directory)", elem_id="smp-ckpt")
                    sampler = gr.Radio(list(SAMPLERS), value="ddim", label="sampler", elem_id="smp-sampler")
                    steps = gr.Slider(1, 200, value=20, step=1, label="steps", elem_id="smp-steps")
                    seed = gr.Number(0, label="seed", precision=0, elem_id="smp-seed")
                    n = gr.Slider(1, 64, value=16, step=1, label="images", elem_id="smp-n")
                    prompt = gr.Textbox(label="prompt (text models)", placeholder="a large red circle in the center",
                                        elem_id="smp-prompt")
                    guidance = gr.Slider(0, 10, value=3, step=0.25, label="guidance scale (conditional models)",
                                         elem_id="smp-guidance")
                    guider = gr.Radio(list(GUIDER_CHOICES), value="cfg", elem_id="smp-guider",
                                      label="guider (cfgpp: the scale is its lambda in [0, 1]; auto: a guide checkpoint)")
                    guide_ckpt = gr.Textbox(label="guide checkpoint (guider auto)", elem_id="smp-guide")
                    run = gr.Button("Sample", variant="primary", elem_id="smp-run")
                with gr.Column(scale=2):
                    status = gr.Markdown("", elem_id="smp-status")
                    with gr.Row():
                        xt_view = gr.Image(label="x_t", format="png", height=240, elem_id="smp-xt")
                        x0_view = gr.Image(label="predicted x_0", format="png", height=240, elem_id="smp-x0")
                    final = gr.Image(label="samples (sample.py's grid.png)", type="filepath", format="png", height=320,
                                     elem_id="smp-final")
            ckpt.change(default_guidance, ckpt, guidance)
            app.load(default_guidance, ckpt, guidance)
            run.click(sampling_stream, [ckpt, sampler, steps, seed, n, prompt, guidance, guider, guide_ckpt],
                      [xt_view, x0_view, final, status])

        with gr.Tab("Compare"):
            with gr.Row():
                cmp_a = gr.Radio(list(SAMPLERS), value="ddim", label="sampler A", elem_id="cmp-a")
                cmp_steps_a = gr.Slider(1, 200, value=10, step=1, label="steps A")
                cmp_b = gr.Radio(list(SAMPLERS), value="dpmpp_2m", label="sampler B", elem_id="cmp-b")
                cmp_steps_b = gr.Slider(1, 200, value=10, step=1, label="steps B")
            cmp_run = gr.Button("Sample both from the same noise", elem_id="cmp-run")
            with gr.Row():
                grid_a = gr.Image(label="sampler A", type="filepath", format="png", elem_id="cmp-grid-a")
                grid_b = gr.Image(label="sampler B", type="filepath", format="png", elem_id="cmp-grid-b")
            cmp_run.click(compare_samplers, [ckpt, cmp_a, cmp_steps_a, cmp_b, cmp_steps_b, seed, n, prompt, guidance,
                                             guider, guide_ckpt], [grid_a, grid_b])
            gr.Markdown("Two schedules noising the same image with the same noise, at the same fraction of T:")
            with gr.Row():
                sched_a = gr.Radio(schedules, value="linear", label="schedule A", elem_id="cmp-sched-a")
                sched_b = gr.Radio(schedules, value="cosine", label="schedule B", elem_id="cmp-sched-b")
                fraction = gr.Slider(0, 1, value=0.5, step=0.01, label="t / T", elem_id="cmp-fraction")
            with gr.Row():
                view_a = gr.Image(label="schedule A", format="png", height=200, elem_id="cmp-view-a")
                view_b = gr.Image(label="schedule B", format="png", height=200, elem_id="cmp-view-b")
                both = gr.Plot(label="alpha-bar and log SNR")
            sched_inputs = [dataset, index, upload, sched_a, sched_b, fraction]
            for control in (sched_a, sched_b, fraction):
                control.change(compare_schedules, sched_inputs, [view_a, view_b, both])
            app.load(compare_schedules, sched_inputs, [view_a, view_b, both])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: reachable from others)")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--ckpt", action="append", default=[], help="a checkpoint or run directory to list (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env_port = os.environ.get("GRADIO_SERVER_PORT")  # Gradio reads it on import
    if env_port is not None and not (env_port.isdigit() and 0 < int(env_port) < 65536):
        sys.exit(f"error: GRADIO_SERVER_PORT={env_port!r} must be a port number in 1..65535 (or unset it and pass --port)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit("error: the playground needs Gradio: pip install -e '.[app]'")
    for path in args.ckpt:
        try:
            resolve_checkpoint(path)
        except FileNotFoundError as e:
            sys.exit(f"error: --ckpt {e}")
    if args.port is not None and not 0 < args.port < 65536:
        sys.exit(f"error: --port {args.port} must lie in 1..65535")
    app = build_app(args.ckpt)
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False, show_error=True,
                           footer_links=[])
    except OSError as e:
        sys.exit(f"error: cannot serve on {args.host}:{args.port or os.environ.get('GRADIO_SERVER_PORT', 7860)} ({e}); "
                 f"pass another --port")


if __name__ == "__main__":
    main()
