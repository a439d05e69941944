"""``python -m diffexp.viz COMMAND ...``: the course's figures and animations from the command line.

    python -m diffexp.viz forward --schedule cosine --image PATH --out forward.gif
    python -m diffexp.viz forward --schedule linear --schedule cosine --out forward.png   (built-in digit)
    python -m diffexp.viz histogram --schedule linear --out histogram.png
    python -m diffexp.viz schedules --out schedules.png
    python -m diffexp.viz unet --preset small --image-size 32 --channels 3 --out unet.png --table unet.md
    python -m diffexp.viz trajectories --ckpt RUN/checkpoints/last.ckpt --out ddpm_vs_ddim.png
    python -m diffexp.viz guidance --ckpt RUN/checkpoints/last.ckpt --prompt "a red circle" --out guidance.png
    python -m diffexp.viz interpolate --ckpt RUN/checkpoints/last.ckpt --out interp.png   (or interp.gif)
    python -m diffexp.viz interpolate --ckpt CKPT --prompt "a red circle" --prompt "a blue square" --out interp.png
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from diffexp.schedules import SCHEDULES  # noqa: E402

def builtin_image(size: int | None):
    """The first handwritten digit of scikit-learn's bundled set (offline), in [-1, 1]."""
    from diffexp.data.digits import load_digits_tensor

    images, _ = load_digits_tensor(size or 32)
    return images[0]


def check_schedules(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in SCHEDULES]
    if bad:
        raise SystemExit(f"error: --schedule {bad[0]!r} is not a known schedule; choose from {list(SCHEDULES)}")
    return names


def save_figure(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def cmd_forward(args) -> Path:
    from diffexp.viz.animation import save_animation
    from diffexp.viz.forward import forward_animation_frames, forward_grid_figure
    from diffexp.images import load_image

    schedules = check_schedules(args.schedule or ["linear", "cosine"])
    image = load_image(args.image, args.size) if args.image else builtin_image(args.size)
    out = Path(args.out)
    if out.suffix.lower() in (".gif", ".mp4"):
        return save_animation(forward_animation_frames(image, schedules, args.frames, scale=args.scale), out, args.fps)
    save_figure(forward_grid_figure(image, schedules), out)
    return out


def cmd_histogram(args) -> Path:
    from diffexp.viz.forward import histogram_figure
    from diffexp.images import load_image

    schedule = check_schedules([args.schedule])[0]
    image = load_image(args.image, args.size) if args.image else builtin_image(args.size)
    save_figure(histogram_figure(image, schedule), Path(args.out))
    return Path(args.out)


def cmd_schedules(args) -> Path:
    from diffexp.viz.schedules import schedules_figure

    names = check_schedules(args.schedule or list(SCHEDULES))
    save_figure(schedules_figure(names, args.timesteps, zero_terminal_snr=args.zero_terminal_snr), Path(args.out))
    return Path(args.out)


def cmd_unet(args) -> Path:
    from diffexp.course import net_preset
    from diffexp.viz.unet import layer_table_markdown, unet_diagram

    net = net_preset(args.preset, args.image_size, args.channels, args.context_dim)
    if args.table:
        Path(args.table).write_text(layer_table_markdown(net) + "\n")
    save_figure(unet_diagram(net), Path(args.out))
    return Path(args.out)


def load(args):
    from diffexp.api import load_model, resolve_device

    model, _ = load_model(args.ckpt, device=resolve_device(args.device))
    return model


def cmd_trajectories(args) -> Path:
    import torch

    from diffexp.course import sampler
    from diffexp.viz.reverse import trajectories, trajectory_figure

    model = load(args)
    ddpm = sampler(model, "ddpm")
    samplers = {f"DDPM-{len(ddpm.timesteps)}": ddpm, f"DDIM-{args.steps}": sampler(model, "ddim", args.steps)}
    cond = {"captions": [args.prompt]} if args.prompt else model.conditioner.for_sampling(torch.arange(1))
    save_figure(trajectory_figure(trajectories(model, samplers, n=1, seed=args.seed, **cond), args.frames), Path(args.out))
    return Path(args.out)


def cmd_guidance(args) -> Path:
    from diffexp.viz.guidance import guidance_figure, guidance_samples

    model = load(args)
    samples = guidance_samples(model, args.prompt, args.scales, n=args.n, seed=args.seed)
    save_figure(guidance_figure(samples, args.prompt), Path(args.out))
    return Path(args.out)


def cmd_interpolate(args) -> Path:
    from diffexp.course import sampler as make_sampler
    from diffexp.images import save_grid
    from diffexp.viz.animation import frames_from_images, save_animation
    from diffexp.viz.interpolation import interpolation_figure, interpolation_frames

    suffix = Path(args.out).suffix.lower()
    allowed = (".png", ".jpg", ".pdf", ".svg", ".gif", ".mp4")
    if suffix not in allowed:
        raise ValueError(f"--out {args.out!r}: the file type comes from its suffix, one of {list(allowed)}")
    if suffix == ".mp4" and importlib.util.find_spec("imageio") is None:
        raise ValueError("--out .mp4 needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg); or "
                         "write a .gif")
    if args.plain and suffix != ".png":
        raise ValueError("--plain writes a bare .png row; pass --out with .png")
    if args.frames < 2:
        raise ValueError(f"--frames must be at least 2, got {args.frames}")
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    prompts = args.prompt
    if prompts is not None and len(prompts) not in (1, 2):
        raise ValueError(f"--prompt takes one prompt (noise interpolation under it) or two (from one to the other), "
                         f"got {len(prompts)}")
    if prompts is not None and len(prompts) == 1:
        prompts = prompts * 2
    model = load(args)
    sampler = make_sampler(model, "ddim", args.steps)
    moving_prompt = prompts is not None and prompts[0] != prompts[1]
    seed_b = args.seed_b if args.seed_b is not None else (args.seed if moving_prompt else args.seed + 1)
    images = interpolation_frames(model, args.frames, args.seed, seed_b, prompts and tuple(prompts), sampler,
                                  args.guidance_scale).cpu()
    out = Path(args.out)
    if out.suffix.lower() in (".gif", ".mp4"):
        frames = frames_from_images([image[None] for image in images], scale=args.scale)
        return save_animation(frames + frames[-2:0:-1], out, args.fps)  # there and back, a loop
    if args.plain:
        return save_grid(images, out, nrow=len(images), scale=args.scale)
    title = f"seed {args.seed} -> {seed_b}" + (f'; "{prompts[0]}" -> "{prompts[1]}"' if moving_prompt else "")
    save_figure(interpolation_figure(images, title), out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffexp.viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("forward", help="x_t along t for one or more schedules: .png grid or .gif/.mp4 animation")
    p.add_argument("--schedule", action="append", help=f"repeatable; one of {list(SCHEDULES)}")
    p.add_argument("--image", help="an image file (default: a built-in digit)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--fps", type=float, default=10)
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of animation frames")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_forward)
    p = sub.add_parser("histogram", help="pixel histogram of x_t drifting to N(0, 1)")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--image")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_histogram)
    p = sub.add_parser("schedules", help="alpha-bar, beta, log-SNR, signal left for several schedules")
    p.add_argument("--schedule", action="append")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--zero-terminal-snr", nargs="*", default=["linear"], help="schedules also drawn rescaled")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_schedules)
    p = sub.add_parser("unet", help="U-Net diagram (and --table markdown) of a conf/net U-Net preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--context-dim", type=int, default=None)
    p.add_argument("--table")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_unet)
    for name, fn, help_ in (("trajectories", cmd_trajectories, "DDPM vs DDIM from the same noise"),
                            ("guidance", cmd_guidance, "one prompt at several guidance scales")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--ckpt", required=True)
        p.add_argument("--device", default="auto")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
        p.add_argument("--prompt", required=name == "guidance")
        if name == "trajectories":
            p.add_argument("--steps", type=int, default=50)
            p.add_argument("--frames", type=int, default=8)
        else:
            p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 7.5])
            p.add_argument("--n", type=int, default=4)
        p.set_defaults(run=fn)
    p = sub.add_parser("interpolate", help="a row of samples between two noises (and two prompts), DDIM-decoded")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM (eta 0) steps per frame")
    p.add_argument("--seed", type=int, default=0, help="noise of the first frame")
    p.add_argument("--seed-b", type=int, default=None,
                   help="noise of the last frame (default: seed + 1; with two different prompts: seed)")
    p.add_argument("--prompt", action="append", help="text models: once (noise interpolation under it) or twice "
                   "(from the first prompt to the second)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of .gif frames and --plain grids")
    p.add_argument("--fps", type=float, default=6)
    p.add_argument("--plain", action="store_true", help=".png: the bare image row, no labels")
    p.add_argument("--out", required=True, help=".png (a labelled row) or .gif/.mp4 (there and back)")
    p.set_defaults(run=cmd_interpolate)
    args = parser.parse_args(argv)
    try:
        out = args.run(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
