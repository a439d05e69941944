"""The visual layer: figures, animations and the `python -m diffexp.viz` CLI."""
from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from diffexp.nets import UNet  # noqa: E402
from diffexp.schedules import get_schedule  # noqa: E402
from diffexp.viz import animation, forward, reverse, schedules, unet  # noqa: E402
from diffexp.viz.images import load_image  # noqa: E402


def image():
    return torch.linspace(-1, 1, 3 * 16 * 16).reshape(3, 16, 16)


def test_noised_frames_follow_the_forward_formula_with_one_noise_draw():
    x0 = image()
    frames = forward.noised(x0, "cosine", [0, 500, 999], seed=3)
    schedule = get_schedule("cosine")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    for frame, t in zip(frames, [0, 500, 999]):
        abar = schedule.alphas_cumprod.float()[t]
        expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        torch.testing.assert_close(frame, expected)
    with pytest.raises(ValueError, match="outside"):
        forward.noised(x0, "linear", [1000])


def test_forward_animation_has_one_frame_per_step_and_schedules_side_by_side(tmp_path):
    frames = forward.forward_animation_frames(image(), ["linear", "cosine", "quadratic"], num_frames=7, scale=2)
    assert len(frames) == 7
    height, width = frames[0].shape[:2]
    assert height == (16 + 2) * 2 and width == (3 * (16 + 1) + 1) * 2  # 3 tiles with 1px padding, x2
    path = animation.save_animation(frames, tmp_path / "f.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 7 and gif.size == (width, height)
    with pytest.raises(ValueError, match=".gif or .mp4"):
        animation.save_animation(frames, tmp_path / "f.avi")


def test_forward_grid_and_histogram_figures_have_one_panel_per_cell():
    fig = forward.forward_grid_figure(image(), ["linear", "cosine"], timesteps=(0, 10, 999))
    assert len(fig.axes) == 6
    fig = forward.histogram_figure(image(), "linear", timesteps=(0, 999))
    assert len(fig.axes) == 2
    # at t = T-1 the histogram is close to N(0, 1)
    last = forward.noised(torch.zeros(1, 64, 64), "linear", [999])[0]
    assert abs(last.mean().item()) < 0.05 and abs(last.std().item() - 1) < 0.05


def test_schedule_curves_match_the_schedule_and_the_figure_has_four_panels():
    curves = schedules.schedule_curves("cosine", 1000)
    s = get_schedule("cosine", 1000)
    np.testing.assert_allclose(curves["alpha_bar"], s.alphas_cumprod.numpy())
    np.testing.assert_allclose(curves["signal"], np.sqrt(s.alphas_cumprod.numpy()))
    np.testing.assert_allclose(curves["log_snr"], np.log(s.alphas_cumprod / (1 - s.alphas_cumprod)).numpy())
    ztsnr = schedules.schedule_curves("linear", 1000, zero_terminal_snr=True)
    assert ztsnr["alpha_bar"][-1] == 0.0
    fig = schedules.schedules_figure(["linear", "cosine"])
    assert len(fig.axes) == 4 and len(fig.axes[0].lines) == 3  # 2 schedules + linear rescaled
    with pytest.raises(ValueError, match="not known"):
        schedules.schedules_figure(["nope"])


def test_unet_layer_table_traces_the_real_forward_pass():
    net = UNet(image_size=16, in_channels=1, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
               attention_resolutions=[], attention_levels=[-1], context_dim=8)
    rows = unet.layer_table(net)
    assert rows[0]["stage"] == "in" and rows[-1]["stage"] == "out" and rows[-1]["output"] == (1, 16, 16)
    assert [r["output"] for r in rows if r["stage"] == "mid"] == [(64, 8, 8)]
    assert sum(r["skip"] == "push" for r in rows) == sum(r["skip"] == "pop" for r in rows)
    assert any("text" in r["inputs"] for r in rows) and all(r["params"] > 0 for r in rows)
    counted = sum(r["params"] for r in rows) + sum(p.numel() for p in net.time_mlp.parameters())
    counted += sum(p.numel() for p in net.pooled_proj.parameters())
    assert counted == sum(p.numel() for p in net.parameters())
    assert "| **total** |" in unet.layer_table_markdown(net)
    assert unet.unet_diagram(net).axes


def test_trajectory_and_guidance_figures_from_a_checkpoint(tiny_checkpoint):
    from diffexp.samplers import DDIMSampler
    from diffexp.api import load_model

    model, _ = load_model(tiny_checkpoint)
    kw = dict(prediction_type=model.prediction.sampler_type, progress=False)
    trajs = reverse.trajectories(model, {"a": DDIMSampler(model.path, steps=3, **kw),
                                         "b": DDIMSampler(model.path, steps=5, **kw)}, n=2)
    assert torch.equal(trajs["a"].xs[0], trajs["b"].xs[0])  # the same x_T
    fig = reverse.trajectory_figure(trajs, frames=3)
    assert len(fig.axes) == 4 * 4  # 2 samplers x (x_t, x0) rows, 3 frames + final sample
    fig = reverse.quality_vs_steps_figure([{"sampler": "ddim", "steps": s, "fid": 1.0 / s} for s in (10, 20)], "fid")
    assert len(fig.axes[0].lines) == 1
    from diffexp.viz.guidance import guidance_samples

    with pytest.raises(ValueError, match="text-conditioned"):
        guidance_samples(model, "a cat")


def test_load_image_reads_resizes_and_reports_bad_paths(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.full((10, 12, 3), 255, np.uint8)).save(path)
    img = load_image(path, size=8)
    assert img.shape == (3, 8, 8) and torch.allclose(img, torch.ones_like(img))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="could not be read"):
        load_image(tmp_path / "bad.png")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffexp.viz", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_writes_files_and_rejects_bad_input(tmp_path):
    image_path = tmp_path / "in.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image_path)
    result = run_cli("forward", "--schedule", "cosine", "--image", str(image_path), "--size", "16", "--frames", "5",
                     "--out", str(tmp_path / "forward.gif"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "forward.gif") as gif:
        assert gif.n_frames == 5
    for args in (["schedules", "--out", str(tmp_path / "s.png")],
                 ["unet", "--preset", "tiny", "--out", str(tmp_path / "u.png"), "--table", str(tmp_path / "u.md")]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "s.png").stat().st_size > 0 and "| **total** |" in (tmp_path / "u.md").read_text()
    result = run_cli("forward", "--schedule", "nope", "--out", str(tmp_path / "x.gif"))
    assert result.returncode != 0 and "'nope' is not a known schedule" in result.stderr
    result = run_cli("forward", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.gif"))
    assert result.returncode != 0 and "missing.png" in result.stderr and "does not exist" in result.stderr
    result = run_cli("unet", "--preset", "huge", "--out", str(tmp_path / "u.png"))
    assert result.returncode != 0 and "tiny" in result.stderr


@pytest.mark.slow
def test_interpolate_cli_writes_a_row_or_an_animation_and_rejects_bad_input(tiny_checkpoint, tmp_path):
    """``python -m diffexp.viz interpolate --ckpt PATH --out interp.png`` as the README types it."""
    result = run_cli("interpolate", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "interp.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "interp.png").size[0] > 8 * 16
    result = run_cli("interpolate", "--ckpt", str(tiny_checkpoint), "--frames", "4", "--steps", "3", "--plain",
                     "--scale", "1", "--out", str(tmp_path / "plain.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "plain.png").size == (4 * 17 + 1, 18)  # 4 frames of 16 px with 1 px padding
    result = run_cli("interpolate", "--ckpt", str(tiny_checkpoint), "--frames", "3", "--steps", "2",
                     "--out", str(tmp_path / "interp.gif"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "interp.gif") as gif:
        assert gif.n_frames == 4  # there and back: 0 1 2 1
    for args, message in [(["--frames", "1"], "--frames must be at least 2"),
                          (["--prompt", "a cat"], "needs a text-conditioned checkpoint"),
                          (["--prompt", "a", "--prompt", "b", "--prompt", "c"], "one prompt"),
                          (["--out", str(tmp_path / "x.txt")], "file type comes from its suffix"),
                          (["--ckpt", str(tmp_path / "none.ckpt")], "none.ckpt")]:
        result = run_cli("interpolate", "--ckpt", str(tiny_checkpoint), "--steps", "2",
                         "--out", str(tmp_path / "bad.png"), *args)  # the args given last win
        assert result.returncode != 0 and message in result.stderr, result.stderr[-600:]
