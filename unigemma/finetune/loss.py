"""The training forward and its loss: hidden states with optional gradient checkpointing per
decoder layer, then cross-entropy on the label tokens only.

`hidden_states` is `CausalLM.forward` without a cache (models/base.py): embed (soft tokens in
place) → the family's masks (causal, sliding window, padding, bidirectional image / video blocks
exactly as inference builds them) → the decoder layers → final norm. It runs the layer loop
itself only to wrap each layer in `torch.utils.checkpoint` (non-reentrant): a layer's
activations are recomputed in the backward pass instead of kept, so activation memory is one
layer's plus each layer's input. `checkpointing=False` is the plain path.

`label_loss` never builds the full [B, S, vocab] logits: only positions whose next token is a
label go through the head (TRL's "skip lm_head on ignored labels"), in chunks of CHUNK rows
whose input gradient is taken at once (`_HeadLoss`), so one chunk's logits exist at a time
(262,144-wide fp32 logits are 1 MiB a token: 1 GiB at 1,024 tokens, twice with their gradient)
and the head runs twice per row, as in a plain backward. Logits are cast to fp32 before the
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
from ..models.layers import softcap
from ..models.upcast import upcast_matmul
from ..quant.kernels import plan
from .labels import IGNORE

CHUNK = 128  # label positions per head + cross-entropy chunk
HEAD_BLOCK_ROWS = 8192  # vocabulary rows of the head per GEMM (a 262,144-row one is half as fast)


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


def _vocab_blocks(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.linear(h, weight[r:r + HEAD_BLOCK_ROWS]) for r in range(0, weight.shape[0], HEAD_BLOCK_ROWS)],
                     dim=-1)


class _VocabBlocks(torch.autograd.Function):
    """logits = h Wᵀ for a frozen float32 head, computed a block of vocabulary rows at a time;
    backward dh = dy W in one GEMM. One CPU GEMM against all 262,144 rows runs at half the speed
    of the same product in 8,192-row blocks (AVX2, 128 x 1,536 rows: 3.7 s against 1.6), while
    dy W is fastest whole (blocked, its strided slices of dy cost twice)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _vocab_blocks(h, weight)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return dy @ weight, None


def _head(model, h: torch.Tensor) -> torch.Tensor:
    """model.head(h) for training; a frozen head on the CPU runs blocked: float32 in blocks of
    vocabulary rows (`_VocabBlocks`), bf16 where it is emulated as float32 GEMMs over upcast blocks
    (models/upcast.py), forward and backward. The plain head elsewhere."""
    w = model.head_weight()
    if w is None or w.device.type != "cpu" or w.requires_grad:
        return model.head(h)
    cap = model.config.text.final_logit_softcapping
    if w.dtype == torch.bfloat16 and plan().float_linear(w.dtype) == "upcast":
        return softcap(upcast_matmul(h, w, block_bytes=HEAD_BLOCK_ROWS * 4 * w.shape[1]), cap)
    if w.dtype == torch.float32 and h.dtype == torch.float32:
        grad = h.requires_grad and torch.is_grad_enabled()
        return softcap(_VocabBlocks.apply(h, w) if grad else _vocab_blocks(h, w), cap)
    return model.head(h)


def _chunk_loss(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_head(model, h).float(), targets, reduction="sum")


class _HeadLoss(torch.autograd.Function):
    """Σ cross-entropy of rows [n, hidden] through the head, chunk by chunk, with each chunk's
    gradient d loss / d rows taken in the forward pass (Liger's fused linear cross-entropy, done
    with autograd): only one chunk's logits ever exist, and the head runs twice (forward and
    its input gradient), not three times as a recomputed (checkpointed) chunk would."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, model) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad = torch.empty_like(rows)
        with torch.enable_grad():
            for a in range(0, rows.shape[0], CHUNK):
                hc = rows[a:a + CHUNK].detach().requires_grad_()
                loss = _chunk_loss(model, hc, targets[a:a + CHUNK])
                grad[a:a + CHUNK] = torch.autograd.grad(loss, hc)[0]
                total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


def label_loss(model, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the label tokens' cross-entropy, their count): position t predicts labels[t + 1]."""
    targets = labels[:, 1:].to(h.device)
    keep = targets != IGNORE
    rows, targets = h[:, :-1][keep], targets[keep]
    n = int(targets.numel())
    if n == 0:
        return h.sum() * 0.0, 0
    if not torch.is_grad_enabled() or not rows.requires_grad:
        return sum(_chunk_loss(model, rows[a:a + CHUNK], targets[a:a + CHUNK]) for a in range(0, n, CHUNK)), n
    head_trains = any(p.requires_grad for p in model.output.parameters()) if isinstance(
        model.output, torch.nn.Module) else False
    if head_trains:  # the fused path gives the rows' gradient only: a trained head recomputes its chunks
        return sum(checkpoint(_chunk_loss, model, rows[a:a + CHUNK], targets[a:a + CHUNK], use_reentrant=False)
                   for a in range(0, n, CHUNK)), n
    return _HeadLoss.apply(rows, targets, model), n
