"""Pillow drawings: named shapes in named colours on varied backgrounds, and rendered text.

Drawn 4x larger and downsampled, so edges are anti-aliased as in photos and screenshots.
Every function takes its randomness from the `random.Random` passed in (fixed seeds upstream).
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .vocab import COLOURS, find_font

SS = 4  # supersampling factor
MIN_CONTRAST = 140  # least RGB distance between the background and any drawn colour


def _regular(n: int, cx: float, cy: float, r: float, turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(turn + 2 * math.pi * k / n), cy + r * math.sin(turn + 2 * math.pi * k / n))
            for k in range(n)]


def _star(cx, cy, r):
    outer, inner = _regular(5, cx, cy, r), _regular(5, cx, cy, r * 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _cross(cx, cy, r):
    a = r * 0.34
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a)]


def _heart(cx, cy, r):
    # the classic parametric heart, x in [-16, 16], y in [-17, 12] (screen y down)
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + r * x / 16, cy - r * (y + 2.5) / 15))
    return pts


def _arrow(cx, cy, r):  # pointing right
    a, h = r * 0.28, r * 0.1
    return [(cx - r, cy - a), (cx + h, cy - a), (cx + h, cy - r * 0.75), (cx + r, cy),
            (cx + h, cy + r * 0.75), (cx + h, cy + a), (cx - r, cy + a)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """One shape whose bounding box is about the circle of radius r around (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    polygon = {
        "square": lambda: [(cx - r * .85, cy - r * .85), (cx + r * .85, cy - r * .85),
                           (cx + r * .85, cy + r * .85), (cx - r * .85, cy + r * .85)],
        "triangle": lambda: [(cx, cy - r), (cx + r, cy + r * .8), (cx - r, cy + r * .8)],
        "star": lambda: _star(cx, cy, r),
        "pentagon": lambda: _regular(5, cx, cy, r),
        "hexagon": lambda: _regular(6, cx, cy, r, 0.0),
        "diamond": lambda: [(cx, cy - r), (cx + r * .7, cy), (cx, cy + r), (cx - r * .7, cy)],
        "cross": lambda: _cross(cx, cy, r),
        "heart": lambda: _heart(cx, cy, r),
        "arrow": lambda: _arrow(cx, cy, r),
    }.get(shape)
    if polygon is None:
        raise ValueError(f"unknown shape {shape!r}")
    draw.polygon(polygon(), fill=fill)


def _distance(a, b) -> float:
    return math.dist(a, b)


def jitter(rgb, rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def rgb(colour) -> tuple[int, int, int]:
    """A colour's RGB: a name of vocab.COLOURS, or already an (r, g, b)."""
    return COLOURS[colour] if isinstance(colour, str) else tuple(colour)


def background(rng: random.Random, avoid: list, size: int) -> Image.Image:
    """A plain, two-tone gradient or speckled background far from every colour in `avoid` (names or RGB)."""
    def pick():
        for _ in range(1000):
            c = tuple(rng.randint(0, 255) for _ in range(3))
            if all(_distance(c, rgb(n)) >= MIN_CONTRAST for n in avoid):
                return c
        raise RuntimeError(f"no background contrasts with {avoid}")

    style = rng.choice(("plain", "gradient", "speckle"))
    a = pick()
    img = Image.new("RGB", (size, size), a)
    if style == "gradient":
        b, draw = pick(), ImageDraw.Draw(img)
        for y in range(size):
            t = y / max(1, size - 1)
            draw.line((0, y, size, y), fill=tuple(round(a[i] * (1 - t) + b[i] * t) for i in range(3)))
    elif style == "speckle":
        px = img.load()
        for _ in range(size * size // 12):
            x, y = rng.randrange(size), rng.randrange(size)
            px[x, y] = jitter(a, rng, 30)
    return img


def shapes_picture(rng: random.Random, items: list[tuple[str, str, float, float, float]], size: int) -> Image.Image:
    """items: (colour, shape, cx, cy, r) in output pixels; colour a name or an (r, g, b)."""
    big = background(rng, [c for c, *_ in items], size).resize((size * SS, size * SS), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for colour, shape, cx, cy, r in items:
        draw_shape(draw, shape, cx * SS, cy * SS, r * SS, jitter(rgb(colour), rng))
    return big.resize((size, size), Image.LANCZOS)


def layout(rng: random.Random, n: int, size: int, r_range: tuple[float, float]) -> list[tuple[float, float, float]]:
    """n non-overlapping (cx, cy, r) circles inside the picture (rejection sampling)."""
    for _ in range(2000):
        out = []
        for _ in range(n):
            r = rng.uniform(*r_range) * size
            cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
            if all(math.dist((cx, cy), (x, y)) > r + q + size * 0.04 for x, y, q in out):
                out.append((cx, cy, r))
            else:
                break
        if len(out) == n:
            return out
    raise RuntimeError(f"cannot place {n} shapes on {size}px")


def text_picture(rng: random.Random, text: str, font_file: str, size: int) -> Image.Image:
    """`text` in the given font, as large as fits, in a colour contrasting with the background."""
    path = find_font(font_file)
    if path is None:
        raise FileNotFoundError(f"font {font_file} not found (install fonts-dejavu-core fonts-liberation "
                                "fonts-freefont-ttf)")
    colour = rng.choice(("black", "white", "blue", "red", "green", "purple", "brown"))
    img = background(rng, [colour], size)
    draw = ImageDraw.Draw(img)
    width = size * rng.uniform(0.7, 0.92)
    pt = size
    while pt > 8:  # largest size whose box fits the width and ~half the height
        font = ImageFont.truetype(str(path), pt)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= width and bottom - top <= size * 0.5:
            break
        pt -= 2
    w, h = right - left, bottom - top
    x = rng.uniform(2, max(2, size - w - 2)) - left
    y = rng.uniform(2, max(2, size - h - 2)) - top
    draw.text((x, y), text, font=font, fill=jitter(COLOURS[colour], rng, 10))
    if rng.random() < 0.3:  # a little blur now and then, as in scans and photos
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img
