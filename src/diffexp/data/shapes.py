"""Procedural captioned shapes: one coloured shape at a named position on a dark background.

Each image is 32x32 RGB (configurable) with a circle, square, triangle or diamond of one of six
colours, small or large, in one cell of a 3x3 grid, captioned e.g. "a small red circle in the
top left". Rendering is anti-aliased (4x supersampling) and deterministic from the seed.
Colour-shape pairs listed in ``holdout`` never appear in the training split, so text
conditioning can be tested on combinations the model has not seen together.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from diffexp.data.base import ImageDataModule, TensorImageDataset
from diffexp.registry import register_part

COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 0.95),
           "yellow": (0.95, 0.85, 0.15), "magenta": (0.9, 0.2, 0.85), "cyan": (0.15, 0.85, 0.9)}
SHAPES = ("circle", "square", "triangle", "diamond")  # the default data
NEW_SHAPES = ("star",)  # off by default: a concept to teach a trained model (data.shapes=[star])
ALL_SHAPES = SHAPES + NEW_SHAPES
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = {"small": 0.28, "large": 0.42}  # half-extent as a fraction of a grid cell
BACKGROUND = (0.06, 0.06, 0.08)
DEFAULT_HOLDOUT = (("red", "triangle"), ("blue", "circle"), ("green", "square"))


def caption_for(colour: str, shape: str, position: str, size: str) -> str:
    where = "in the center" if position == "center" else f"in the {position}"
    return f"a {size} {colour} {shape} {where}"


def star_vertices(outer: float, inner: float, points: int = 5) -> torch.Tensor:
    """(2 * points, 2) vertices (x, y; y down) of a star, alternating tips at radius ``outer`` and notches at ``inner``,
    the first tip straight up."""
    angles = torch.arange(2 * points) * torch.pi / points - torch.pi / 2
    radii = torch.tensor([outer, inner]).repeat(points)
    return torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=1)


def inside_polygon(x: torch.Tensor, y: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Whether each point (x, y) lies inside the polygon (even-odd rule: a ray to +x crosses an odd number of
    edges)."""
    inside = torch.zeros_like(x, dtype=torch.bool)
    for (x1, y1), (x2, y2) in zip(vertices.tolist(), vertices.roll(-1, 0).tolist()):
        if y1 == y2:
            continue
        crosses = ((y1 > y) != (y2 > y)) & (x < x1 + (y - y1) * (x2 - x1) / (y2 - y1))
        inside ^= crosses
    return inside


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int, supersample: int = 4) -> torch.Tensor:
    """Coverage in [0, 1] of ``shape`` centred at (cx, cy) with half-extent ``half`` (pixels), (size, size)."""
    s = size * supersample
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (dx.abs() <= half * 0.9) & (dy.abs() <= half * 0.9)
    elif shape == "triangle":  # pointing up: apex at top, base at bottom
        inside = (dy <= half) & (dy >= -half) & (dx.abs() <= (dy + half) / 2)
    elif shape == "diamond":
        inside = dx.abs() + dy.abs() <= half
    elif shape == "star":  # five points, one straight up; points reach 1.25 half, the notches 0.5 half
        inside = inside_polygon(dx, dy, star_vertices(1.25 * half, 0.5 * half))
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {list(ALL_SHAPES)}")
    return F.avg_pool2d(inside.float()[None, None], supersample)[0, 0]


def render(colour: str, shape: str, position: str, size: str, image_size: int = 32,
           jitter: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """One image in [-1, 1], (3, S, S)."""
    cell = image_size / 3
    row, col = divmod(POSITIONS.index(position), 3)
    cx, cy = (col + 0.5) * cell + jitter[0], (row + 0.5) * cell + jitter[1]
    half = SIZES[size] * cell
    alpha = shape_mask(shape, cx, cy, half, image_size)
    fg = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    return (bg + alpha * (fg - bg)) * 2 - 1


def make_shapes(n: int, seed: int, image_size: int = 32, exclude=(), only=None, shapes=SHAPES):
    """``n`` random shapes: (images (n, 3, S, S) in [-1, 1], captions, attribute labels (n, 4)).

    Labels are indices (colour, shape in :data:`ALL_SHAPES`, position, size). ``exclude`` drops colour-shape
    pairs; ``only`` keeps just those pairs; ``shapes`` are the shapes drawn from (the default four: the default
    data, unchanged by the shapes added since).
    """
    g = torch.Generator().manual_seed(seed)
    colours = list(COLOURS)
    exclude, only = {tuple(p) for p in exclude}, ({tuple(p) for p in only} if only else None)
    images, captions, labels = [], [], []
    while len(images) < n:
        c, s, p, z = (int(torch.randint(k, (1,), generator=g)) for k in (len(colours), len(shapes), len(POSITIONS), len(SIZES)))
        jitter = tuple(((torch.rand(2, generator=g) - 0.5) * image_size / 16).tolist())
        pair = (colours[c], shapes[s])
        if pair in exclude or (only is not None and pair not in only):
            continue
        size = list(SIZES)[z]
        images.append(render(colours[c], shapes[s], POSITIONS[p], size, image_size, jitter))
        captions.append(caption_for(colours[c], shapes[s], POSITIONS[p], size))
        labels.append((c, ALL_SHAPES.index(shapes[s]), p, z))
    return torch.stack(images), captions, torch.tensor(labels)


@register_part
class ShapesDataModule(ImageDataModule):
    """``data=shapes``: ``num_train``/``num_val`` captioned shapes; ``holdout`` pairs only in ``held_out_set``;
    ``shapes``: the shapes drawn (default the four of the default data; ``[star]``: a new concept to fine-tune on);
    ``replay``: that many images of the default shapes added to the training set, so fine-tuning on a new shape
    keeps seeing the known ones (replay of the original data, the role of DreamBooth's prior preservation)."""

    name = "shapes"

    def __init__(self, num_train: int = 20000, num_val: int = 1000, image_size: int = 32, batch_size: int = 128,
                 num_workers: int = 0, seed: int = 0, holdout=DEFAULT_HOLDOUT, channels: int = 3, shapes=SHAPES,
                 replay: int = 0):
        if channels != 3:
            raise ValueError(f"data=shapes is RGB: data.channels must be 3, got {channels}")
        if image_size < 16:
            raise ValueError(f"data.image_size must be >= 16 for shapes, got {image_size}")
        shapes = tuple(shapes) if not isinstance(shapes, str) else (shapes,)
        unknown = [s for s in shapes if s not in ALL_SHAPES]
        if not shapes or unknown or len(set(shapes)) != len(shapes):
            raise ValueError(f"data.shapes must list distinct shapes from {list(ALL_SHAPES)}, got {list(shapes)}")
        for pair in holdout:
            if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in ALL_SHAPES:
                raise ValueError(f"data.holdout entries are [colour, shape] with colour in {list(COLOURS)} and "
                                 f"shape in {list(ALL_SHAPES)}; got {list(pair)}")
        super().__init__(image_size=image_size, channels=3, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.num_train, self.num_val = num_train, num_val
        self.holdout = [tuple(p) for p in holdout]
        self.shapes = shapes
        if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
            raise ValueError(f"data.replay must be a number of images >= 0, got {replay!r}")
        self.replay = replay
        self.held_out_set: TensorImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        kw = dict(image_size=self.image_size, shapes=self.shapes)
        x, caps, y = make_shapes(self.num_train, self.seed, exclude=self.holdout, **kw)
        if self.replay:
            known = make_shapes(self.replay, self.seed + 3, self.image_size, exclude=DEFAULT_HOLDOUT)
            x, caps, y = torch.cat([x, known[0]]), caps + known[1], torch.cat([y, known[2]])
        self.train_set = TensorImageDataset(x, y[:, 1], caps)
        x, caps, y = make_shapes(self.num_val, self.seed + 1, exclude=self.holdout, **kw)
        self.val_set = TensorImageDataset(x, y[:, 1], caps)
        if any(pair[1] in self.shapes for pair in self.holdout):
            x, caps, y = make_shapes(max(1, self.num_val // 4), self.seed + 2, only=self.holdout, **kw)
            self.held_out_set = TensorImageDataset(x, y[:, 1], caps)


def describe(image: torch.Tensor, threshold: float = 0.25) -> dict | None:
    """Read colour, shape, position and size back from one image ((3, S, S) in [-1, 1]).

    Foreground = pixels farther than ``threshold`` from the background colour. Colour = the
    palette entry nearest the mean foreground colour; position = the grid cell of the
    foreground's bounding-box centre; shape and size = the rendered template (every shape of :data:`ALL_SHAPES` x
    size, centred on that box, shifted up to 1 px vertically) closest in L2 to the image's coverage map. None when nothing
    is drawn.
    """
    x = (image.float().clamp(-1, 1) + 1) / 2
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    distance = (x - bg).norm(dim=0)
    fg = distance > threshold
    if fg.sum() < 3:
        return None
    image_size = x.shape[-1]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    palette = torch.tensor(list(COLOURS.values()))
    c = int((palette - x[:, fg].mean(1)).norm(dim=1).argmin())
    coverage = (distance / (palette[c] - bg.view(3)).norm()).clamp(0, 1)
    cy = (float(ys.min()) + float(ys.max()) + 1) / 2
    cx = (float(xs.min()) + float(xs.max()) + 1) / 2
    cell = image_size / 3
    row, col = min(2, int(cy // cell)), min(2, int(cx // cell))
    best = min((float((shape_mask(shape, cx, cy + dy, SIZES[size] * cell, image_size) - coverage).pow(2).sum()),
                 shape, size) for shape in ALL_SHAPES for size in SIZES for dy in (-1.0, -0.5, 0.0, 0.5, 1.0))
    return {"colour": list(COLOURS)[c], "shape": best[1], "position": POSITIONS[row * 3 + col], "size": best[2]}
