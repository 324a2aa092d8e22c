"""A training run's loss curve as a PNG: loss per step (faint), its moving average and the eval loss.

    python -m bench.loss_curve runs/mini-train/log.jsonl docs/mini-training.png [--title ...]

Reads `unigemma finetune`'s log.jsonl (one line per step: loss; eval_loss on eval steps), or takes
the lists (`draw`; bench/finetune_demo.py). Drawn with Pillow (matplotlib is not a dependency) on
a log-scaled loss axis.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 520, 70, 20, 40, 50


def moving_average(values: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def read_log(log: Path) -> tuple[list[float], list[tuple[int, float]]]:
    """log.jsonl → (loss per step, [(step, eval loss)]). A run stopped and resumed logs the steps
    after its last checkpoint twice; the later line of a step is the one the run went on from."""
    rows = {}
    for line in log.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["step"]] = r
    rows = [rows[k] for k in sorted(rows)]
    return [r["loss"] for r in rows], [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def draw(loss: list[float], evals: list[tuple[int, float]], out: Path, title: str, window: int = 25,
         eval_label: str = "eval loss") -> Path:
    steps = list(range(1, len(loss) + 1))
    lo = max(1e-3, min(loss + [v for _, v in evals]))
    hi = max(loss + [v for _, v in evals])
    ly0, ly1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))

    def xy(step, value):
        x = LEFT + (step - 1) / max(1, steps[-1] - 1) * (W - LEFT - RIGHT)
        y = TOP + (ly1 - math.log10(value)) / (ly1 - ly0) * (H - TOP - BOTTOM)
        return x, y

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for e in range(ly0, ly1 + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if 10 ** ly0 <= v <= 10 ** ly1:
                _, y = xy(1, v)
                if TOP <= y <= H - BOTTOM:
                    d.line([(LEFT, y), (W - RIGHT, y)], fill=(225, 225, 225))
                    d.text((8, y - 6), f"{v:g}", fill="black", font=font)
    for k in range(0, 11):
        s = 1 + k * (steps[-1] - 1) / 10
        x, _ = xy(s, lo)
        d.line([(x, H - BOTTOM), (x, H - BOTTOM + 4)], fill="black")
        d.text((x - 10, H - BOTTOM + 8), f"{int(s)}", fill="black", font=font)
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, loss)], fill=(170, 190, 230), width=1)
    d.line([xy(s, v) for s, v in zip(steps, moving_average(loss, window))], fill=(20, 60, 170), width=2)
    if evals:
        d.line([xy(s, v) for s, v in evals], fill=(200, 60, 30), width=2)
        for s, v in evals:
            x, y = xy(s, v)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 60, 30))
    d.text((LEFT, 10), title, fill="black", font=font)
    d.text((W - 330, 10), f"train loss (moving average of {window})", fill=(20, 60, 170), font=font)
    d.text((W - 330, 22), eval_label, fill=(200, 60, 30), font=font)
    d.text((W // 2 - 20, H - 18), "optimizer step", fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG", optimize=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--title", default="unigemma-mini training: label cross-entropy (log scale)")
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--eval-label", default="eval loss")
    args = p.parse_args(argv)
    print(draw(*read_log(args.log), args.out, args.title, args.window, args.eval_label))


if __name__ == "__main__":
    main()
