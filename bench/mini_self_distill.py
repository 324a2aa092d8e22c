"""Keep the mini's prose while a stage trains: match the start model's next-token distributions on text.

The Seventeenth look's stage trained its replay text by cross-entropy on 800 paragraphs: they
were memorised (loss 2.66 -> 0.33 a token) and the prose perplexity went from 11.4 to 110.6.
Here the text's target is the start model's own distribution at every position (a frozen copy,
the teacher): KL(teacher || student), which has nothing to memorise (the target is what the model
already said) and says more per token than one label (the whole distribution). The text is the
replay paragraphs and continuations the teacher samples from their first words (`sample`: its
own prose, at temperature 1), so the constraint covers what the model writes, not only those
paragraphs. Standard practice for keeping a model's behaviour while it learns something new
(self-distillation on replay text); nothing from the prose the stage is scored on.

    teacher = frozen_copy(model)                       # before the adapter is added
    pool = paragraphs + sample(teacher, prompts, ...)  # token-id lists
    loss = kl_loss(model, teacher, rows)               # rows: [n, L] ids, 0-padded, BOS first
"""

from __future__ import annotations

import copy
import random

import torch

from unigemma.finetune.loss import hidden_states
from unigemma.inputs import ModelInputs

CHUNK = 1024  # positions per head + softmax pass: one chunk's 262,144-wide logits at a time


def frozen(model):
    """`model` in eval mode with no parameter trained (a teacher loaded for the purpose)."""
    for q in model.parameters():
        q.requires_grad_(False)
    return model.eval()


def frozen_copy(model):
    """A frozen copy of `model` (the start model as teacher, taken before the adapter is added)."""
    return frozen(copy.deepcopy(model))


def batch_rows(pool: list[list[int]], n: int, length: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows drawn from `pool`, each cut to `length` tokens: (ids [n, L], mask [n, L]) right-padded with 0."""
    rows = [rng.choice(pool)[:length] for _ in range(n)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def sample(teacher, prompts: list[list[int]], new_tokens: int, batch: int = 256, seed: int = 0) -> list[list[int]]:
    """Each prompt continued by `new_tokens` tokens drawn from the teacher at temperature 1 (full
    forwards, no cache: a few seconds on a GPU), stopped at an end-of-text id (1) or turn end (106)."""
    g = torch.Generator(device=teacher.device).manual_seed(seed)
    out = []
    for a in range(0, len(prompts), batch):
        part = prompts[a:a + batch]
        width = min(len(p) for p in part)  # equal-length prompts: no padding inside the batch
        ids = torch.tensor([p[:width] for p in part], device=teacher.device)
        done = torch.zeros(len(part), dtype=torch.bool, device=teacher.device)
        for _ in range(new_tokens):
            h = hidden_states(teacher, ModelInputs(ids))[:, -1]
            probs = torch.softmax(teacher.output(h).float(), -1)
            nxt = torch.multinomial(probs, 1, generator=g)[:, 0]
            done |= (nxt == 1) | (nxt == 106)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if bool(done.all()):
                break
        for row in ids.tolist():
            cut = next((i for i, t in enumerate(row) if i >= width and t in (1, 106)), len(row))
            out.append(row[:cut])
    return out


def kl_loss(model, teacher, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(teacher || model) on the next-token distributions (float32)."""
    inputs = ModelInputs(ids, mask)
    with torch.no_grad():
        target_h = hidden_states(teacher, inputs)
    h = hidden_states(model, inputs)
    on = mask.to(h.device).bool()
    h, target_h = h[on], target_h[on]
    total = h.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], CHUNK):
        with torch.no_grad():
            t = torch.log_softmax(teacher.output(target_h[a:a + CHUNK]).float(), -1)
        s = torch.log_softmax(model.output(h[a:a + CHUNK]).float(), -1)
        total = total + (t.exp() * (t - s)).sum()
    return total / max(h.shape[0], 1)
