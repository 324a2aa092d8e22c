"""Training-only pictures that make colour useless for shape: one shape in an unnamed random colour.

The shipped mini never read a shape, not even on training pairs (README, "Sixth look"): with
every shape drawn in one of ten named colours, the colour was the cheapest clue to the answer,
and the embedder turned towards it. Here the fill is any colour at all, asked "What shape is
this?", so only the outline answers. The held-out axis stays unseen: a fill near a colour whose
pair with this shape is held out (`near_heldout`: close in RGB, or of the same hue, which is all
the embedder's LayerNorm keeps inside a shape) is drawn again, so no held-out colour x shape
pair is shown under another name. Items carry no `pairs` in their meta (no named colour), and
`shape` / `fill` instead; the kind is `any_shape`, never in the held-out split.
"""

from __future__ import annotations

import colorsys
import math

from . import pictures
from .items import Item, _rngs
from .vocab import COLOURS, HELDOUT_PAIRS, SHAPES

KIND = "any_shape"
QUESTIONS = ("What shape is this?", "Name the shape in the picture.", "Which shape is shown?")
NEAR_RGB = 110  # RGB distance under which a fill counts as a named colour
NEAR_HUE = 0.07  # hue distance (of 1) under which two saturated colours look alike inside a shape


def _hue_sat(rgb) -> tuple[float, float]:
    h, _, s = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
    return h, s * (max(rgb) - min(rgb)) / 255


def near_heldout(shape: str, rgb) -> bool:
    """Whether `rgb` could pass for a colour whose pair with `shape` is held out."""
    h, s = _hue_sat(rgb)
    for name, ref in COLOURS.items():
        if (name, shape) not in HELDOUT_PAIRS:
            continue
        if math.dist(rgb, ref) < NEAR_RGB:
            return True
        rh, rs = _hue_sat(ref)
        if s > 0.15 and rs > 0.15 and min(abs(h - rh), 1 - abs(h - rh)) < NEAR_HUE:
            return True
    return False


def make(index: int, seed: int, out, size: int) -> Item:
    """Free-shape item `index`: one shape of any kind in a random fill far from the held-out
    colours of that shape, on a background contrasting with the fill; media under out/media/train/any_shape/."""
    rng, _ = _rngs(seed, "train", KIND, index)
    shape = rng.choice(SHAPES)
    while True:
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        if not near_heldout(shape, fill):
            break
    (cx, cy, r), = pictures.layout(rng, 1, size, (0.18, 0.3))
    img = pictures.shapes_picture(rng, [(fill, shape, cx, cy, r)], size)
    rel = f"media/train/{KIND}/{index:05d}.png"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    img.save(out / rel, format="PNG", optimize=False)
    meta = {"shape": shape, "fill": list(fill), "spots": [[round(cx, 1), round(cy, 1), round(r, 1)]]}
    return Item(f"train-{KIND}-{index:05d}", "train", KIND, rng.choice(QUESTIONS), shape, [("image", rel)], meta)
