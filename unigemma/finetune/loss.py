"""The training forward and its loss: hidden states with optional gradient checkpointing per
decoder layer, then cross-entropy on the label tokens only.

`hidden_states` is `CausalLM.forward` without a cache (models/base.py): embed (soft tokens in
place) → the family's masks (causal, sliding window, padding, bidirectional image / video blocks
exactly as inference builds them) → the decoder layers → final norm. It runs the layer loop
itself only to wrap each layer in `torch.utils.checkpoint` (non-reentrant): a layer's
activations are recomputed in the backward pass instead of kept, so activation memory is one
layer's plus each layer's input. `checkpointing=False` is the plain path.

`label_loss` never builds the full [B, S, vocab] logits: only positions whose next token is a
label go through the head (TRL's "skip lm_head on ignored labels"), in chunks of CHUNK rows,
each chunk's logits recomputed in the backward pass (262,144-wide fp32 logits are 1 MiB a
token: 1 GiB at 1,024 tokens, twice with their gradient). Logits are cast to fp32 before the
softmax, as transformers' loss does. It returns the sum and the count, so gradient
accumulation divides by the label tokens of the whole accumulated batch (the mean over label
tokens transformers reports, without the per-micro-batch bias Unsloth fixed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import FULL, SLIDING
from ..inputs import ModelInputs
from .labels import IGNORE

CHUNK = 256  # label positions per head + cross-entropy chunk


def hidden_states(model, inputs: ModelInputs, checkpointing: bool = False) -> torch.Tensor:
    """Final normed hidden states [B, S, hidden] of a right-padded batch (positions 0..S-1)."""
    ids = inputs.input_ids.to(model.device)
    B, S = ids.shape
    h = model.embed(ids, **{k: v.to(model.device) for k, v in inputs.media().items()})
    valid = None
    if inputs.attention_mask is not None and not bool(inputs.attention_mask.all()):
        valid = inputs.attention_mask.to(model.device).bool()
    idx = torch.arange(S, device=model.device)
    types = inputs.mm_token_type_ids
    masks = model.masks(idx, {SLIDING: idx, FULL: idx}, {SLIDING: valid, FULL: valid},
                        None if types is None else types.to(model.device), model.block_mask)
    text = model.text
    positions = idx.expand(B, S)
    tables = {t: rope.cos_sin(positions, h.dtype) for t, rope in text.ropes.items()}
    for layer in text.layers:
        cos, sin = tables[layer.layer_type]
        if checkpointing and torch.is_grad_enabled():
            h = checkpoint(layer, h, cos, sin, masks[layer.layer_type], use_reentrant=False)
        else:
            h = layer(h, cos, sin, masks[layer.layer_type])
    return text.norm(h)


def _chunk_loss(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.head(h).float(), targets, reduction="sum")


def label_loss(model, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the label tokens' cross-entropy, their count): position t predicts labels[t + 1]."""
    targets = labels[:, 1:].to(h.device)
    keep = targets != IGNORE
    rows, targets = h[:, :-1][keep], targets[keep]
    n = int(targets.numel())
    if n == 0:
        return h.sum() * 0.0, 0
    total = None
    for a in range(0, n, CHUNK):
        hc, tc = rows[a:a + CHUNK], targets[a:a + CHUNK]
        part = (checkpoint(_chunk_loss, model, hc, tc, use_reentrant=False) if torch.is_grad_enabled()
                else _chunk_loss(model, hc, tc))
        total = part if total is None else total + part
    return total, n
