"""Per-patch reading targets for the mini's picture stages: which shape, which colour, each patch shows.

The answers to "What shape is the red one?" teach shape through one token a picture, after the
whole decoder and the head (README, Seventeenth look: not learned at any scale tried). The
Eighth look's reader learned shape from a direct signal on the image block, on one-shape pictures.
This gives that signal on every picture of the shape kinds and keeps the objects apart: every
image patch is labelled with the shape and the colour of the object whose middle covers it
(bench/mmdata/items.py records each object's (cx, cy, r) as `meta["spots"]` beside its `pairs`),
or "background" where no object reaches, and throw-away heads (BatchNorm, Linear: the residual
stream's few huge dimensions swamp a LayerNorm, Eighth look) read them off the image tokens'
hidden states after decoder layer `layer`. Once the tokens say "part of a red star", an answer
has only to look up the token of the colour asked. Patches on an object's edge are not labelled.

    targets = patch_targets(record, image.position_ids, size)   # [patches, 2] (shape, colour), -100 unlabelled
    reader = PatchReader(model, layer)                          # a hook on that layer, and the heads
    loss = reader.loss(inputs, targets)                         # after a forward of `inputs`
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.mmdata.vocab import COLOURS, SHAPES
from unigemma.inputs import IMAGE

IGNORE = -100
SHAPE_CLASSES = len(SHAPES) + 1  # the last: background
COLOUR_NAMES = tuple(COLOURS)
COLOUR_CLASSES = len(COLOUR_NAMES) + 1
INSIDE, OUTSIDE = 0.6, 1.05  # a patch's middle within 0.6 r of an object is it; beyond 1.05 r of all, background


def patch_targets(record: dict, position_ids: torch.Tensor, size: int) -> torch.Tensor:
    """[real patches, 2] long: each real patch's (shape, colour) class in patch order, IGNORE where
    the record has no objects (a written word, a sound) or the patch is on an object's edge, and
    for the colour of a shape in an unnamed fill (free_shapes.py's `meta["shape"]`, no `pairs`).
    `position_ids` [..., P, 2] (x, y), (-1, -1) on padding rows; the picture is `size` px square."""
    pos = position_ids.reshape(-1, 2)
    pos = pos[pos[:, 0] >= 0]
    out = torch.full((len(pos), 2), IGNORE, dtype=torch.long)
    meta = record.get("meta") or {}
    pairs, spots = meta.get("pairs"), meta.get("spots")
    if pairs is None and meta.get("shape") in SHAPES:  # free_shapes.py: one shape, its fill unnamed
        pairs = [[None, meta["shape"]]]
    if not pairs or not spots or len(pairs) != len(spots) or not len(pos):
        return out
    cols, rows = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
    for i, (x, y) in enumerate(pos.tolist()):
        cx, cy = (x + 0.5) * size / cols, (y + 0.5) * size / rows
        d = [math.hypot(cx - sx, cy - sy) / r for sx, sy, r in spots]
        near = min(range(len(d)), key=d.__getitem__)
        if d[near] < INSIDE:
            colour, shape = pairs[near]
            out[i] = torch.tensor([SHAPES.index(shape), IGNORE if colour is None else COLOUR_NAMES.index(colour)])
        elif d[near] > OUTSIDE:
            out[i] = torch.tensor([len(SHAPES), len(COLOUR_NAMES)])
    return out


class PatchReader(nn.Module):
    """Heads on the image tokens' hidden states after decoder layer `layer` (1-based: after the
    first `layer` layers), caught by a forward hook; `loss` after each forward."""

    def __init__(self, model, layer: int):
        super().__init__()
        width = model.config.text.hidden_size
        self.norm = nn.BatchNorm1d(width)
        self.shape = nn.Linear(width, SHAPE_CLASSES)
        self.colour = nn.Linear(width, COLOUR_CLASSES)
        self.to(model.device)
        self._h = None
        self._hook = model.text.layers[layer - 1].register_forward_hook(self._catch)

    def _catch(self, module, args, output):
        self._h = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        self._hook.remove()

    def logits(self, types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape, colour) logits of the last forward's image tokens, in order ([tokens, classes])."""
        h = self._h[types.to(self._h.device) == IMAGE].float()
        z = self.norm(h)
        return self.shape(z), self.colour(z)

    def loss(self, types: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of the shape and colour cross-entropies over the labelled patches (0 if none)."""
        shape, colour = self.logits(types)
        if shape.shape[0] != targets.shape[0]:
            raise ValueError(f"{shape.shape[0]} image tokens in the batch, {targets.shape[0]} patch targets")
        targets = targets.to(shape.device)
        if not bool((targets != IGNORE).any()):
            return shape.sum() * 0
        f = nn.functional.cross_entropy
        return 0.5 * (f(shape, targets[:, 0], ignore_index=IGNORE) + f(colour, targets[:, 1], ignore_index=IGNORE))

    @torch.no_grad()
    def accuracy(self, types: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
        """(shape, colour) accuracy on the labelled object patches (background left out), and their count."""
        shape, colour = self.logits(types)
        targets = targets.to(shape.device)
        on = (targets[:, 0] != IGNORE) & (targets[:, 0] != len(SHAPES))
        n = int(on.sum())
        if not n:
            return 0.0, 0.0, 0
        return (float((shape[on].argmax(-1) == targets[on, 0]).float().mean()),
                float((colour[on].argmax(-1) == targets[on, 1]).float().mean()), n)
