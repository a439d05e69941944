"""Caption adherence for ``data=shapes``: read colour, shape, position and size back from each image."""
from __future__ import annotations

import re

import torch

from diffexp.data.shapes import ALL_SHAPES, COLOURS, POSITIONS, SIZES, describe

ATTRIBUTES = ("colour", "shape", "position", "size")
_CAPTION = re.compile(r"^a (?:(?P<size>%s) )?(?P<colour>%s) (?P<shape>%s)(?: (?:in|at) the (?P<position>%s))?$" % (
    "|".join(SIZES), "|".join(COLOURS), "|".join(ALL_SHAPES), "|".join(sorted(POSITIONS, key=len, reverse=True))))


def parse_caption(caption: str) -> dict:
    """"a small red circle in the top left" -> {"size": "small", "colour": "red", ...}; absent parts are omitted."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"caption {caption!r} is not a shapes caption like 'a small red circle in the top left'")
    return {k: v for k, v in match.groupdict().items() if v is not None}


def caption_adherence(images: torch.Tensor, captions: list[str]) -> dict:
    """Fraction of images whose read-back attributes match their caption: per attribute and all at once.

    Only the attributes a caption names are checked. Images with nothing drawn count as misses.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    hits = {a: 0 for a in ATTRIBUTES}
    asked = {a: 0 for a in ATTRIBUTES}
    all_match = 0
    for image, caption in zip(images, captions):
        want = parse_caption(caption)
        got = describe(image) or {}
        ok = True
        for attr, value in want.items():
            asked[attr] += 1
            if got.get(attr) == value:
                hits[attr] += 1
            else:
                ok = False
        all_match += ok
    result = {f"{a}_accuracy": round(hits[a] / asked[a], 4) for a in ATTRIBUTES if asked[a]}
    result.update(adherence=round(all_match / len(captions), 4), n=len(captions))
    return result
