"""What the image embedder's first LayerNorm leaves of each named colour, in a shape's interior.

    python -m bench.mmdata.patch_colours [--draws 40]

Gemma 4 unified's embedder normalises each 48 x 48 patch over its 6,912 values (LayerNorm, no
encoder before it). A patch inside a shape is one colour, (r, g, b) repeated, and LayerNorm is
blind to x → a x + b: what is left is the hue direction (r - m, g - m, b - m) / std. So brightness
and saturation are gone (orange (255, 140, 0) and brown (130, 80, 30) have the same hue), and a
grey fill (black, white, gray) is the per-shape colour jitter blown up to unit variance: a random
hue. Such colours can only be told apart where the shape meets the background.

For each colour of `vocab.COLOURS`: `--draws` fills jittered as `pictures.jitter` draws them, half
to make each colour's centroid after the LayerNorm, half classified by the nearest centroid
(cosine). Prints one JSON line: the accuracy, and for each colour the colours its fills were
taken for.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

import torch

from .pictures import jitter
from .vocab import COLOURS

PATCH_VALUES = 48 * 48 * 3


def interior(rgb: tuple[int, int, int]) -> torch.Tensor:
    """A uniform patch of `rgb` as the processor gives it (x / 255), through a plain LayerNorm."""
    patch = (torch.tensor(rgb, dtype=torch.float32) / 255).repeat(PATCH_VALUES // 3)
    return torch.nn.functional.layer_norm(patch, (PATCH_VALUES,))  # eps 1e-5, as embed/vision.py


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    half = args.draws // 2
    fills = {name: torch.stack([interior(jitter(rgb, rng)) for _ in range(args.draws)])
             for name, rgb in COLOURS.items()}
    names = list(fills)
    centroids = torch.stack([fills[n][:half].mean(0) for n in names])
    taken_for, right = {}, 0
    for n in names:
        sims = torch.nn.functional.cosine_similarity(fills[n][half:, None], centroids[None], dim=-1)
        picks = Counter(names[i] for i in sims.argmax(-1).tolist())
        taken_for[n] = dict(picks.most_common())
        right += picks[n]
    print(json.dumps({"nearest_centroid_accuracy": round(right / (len(names) * (args.draws - half)), 3),
                      "taken_for": taken_for}))


if __name__ == "__main__":
    main()
