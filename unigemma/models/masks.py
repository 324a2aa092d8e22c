"""Attention masks: causal, sliding window, left padding, bidirectional image/video blocks.

All masks are boolean `[B, 1, Q, K]`, True where a query may attend a key. Queries and keys
are identified by their *sequence index* (the slot in the padded sequence, what the cache
stores), not by their RoPE position, exactly as the reference builds its masks.

Worked example, window 3, one image block `b` at indices 2-3 (`T` text):

    idx      0 1 2 3 4         sliding layer, composition "sliding":
    tokens   T T b b T         a query sees keys in (q-3, q], plus its own block's keys
    q=2 sees   1 1 1 1 .       (2 sees 3: same block; 0 is within the window)
    q=4 sees   . . 1 1 1       (1 and 0 are out of the window)

The sources disagree on how the block mask composes with layer types (spec §4):
  "sliding": bidirectional blocks only on sliding layers and clipped to the window; full
             layers stay causal. This is what llama.cpp, vLLM, keras-hub and transformers'
             own Gemma 4 tests and comments describe as the trained behaviour, and what
             transformers' `generate()` uses with a static cache. Our default.
  "all":     what transformers' plain `model(**inputs)` computes: blocks are bidirectional
             on every layer and not clipped by the window.
Text-only inputs give the same masks under both.
"""

import torch

from ..inputs import VISION_TYPES  # mm_token_type_ids of image and video soft tokens; audio stays causal

COMPOSITIONS = ("sliding", "all")


def block_ids(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] token types → [B, S] id of the contiguous vision run holding each token, else -1.

    boi/eoi tokens are text (type 0), so every image and every video frame is its own block.
    """
    is_vision = (mm_token_type_ids == VISION_TYPES[0]) | (mm_token_type_ids == VISION_TYPES[1])
    prev = torch.zeros_like(is_vision)
    prev[:, 1:] = is_vision[:, :-1]
    starts = is_vision & ~prev
    ids = torch.cumsum(starts.int(), dim=1) - 1
    return torch.where(is_vision, ids, torch.full_like(ids, -1))


def make_mask(
    q_idx: torch.Tensor,  # [Q] or [B, Q] sequence index of each query
    k_idx: torch.Tensor,  # [K] or [B, K] sequence index of each key slot, -1 for an empty slot
    key_valid: torch.Tensor | None,  # [B, K] False for padding keys
    q_block: torch.Tensor | None,  # [B, Q] vision block id per query (-1: none)
    k_block: torch.Tensor | None,  # [B, K] vision block id per key (-1: none)
    window: int | None,  # sliding window (a query sees itself and window-1 earlier tokens)
    composition: str = "sliding",
) -> torch.Tensor:
    """Indices are per row ([B, ·]) when the rows of a batch are independent sequences of
    different lengths (continuous batching), else shared ([·])."""
    if composition not in COMPOSITIONS:
        raise ValueError(f"block mask composition must be one of {COMPOSITIONS}, got {composition!r}")
    q, k = q_idx.unsqueeze(-1), k_idx.unsqueeze(-2)
    if q.dim() == 2:
        q, k = q[None], k[None]  # a batch dimension of 1 that broadcasts
    causal = (k <= q) & (k >= 0)  # [B or 1, Q, K]
    in_window = torch.ones_like(causal) if window is None else k > q - window
    m = causal & in_window
    if q_block is not None and k_block is not None:
        same = (q_block[:, :, None] == k_block[:, None, :]) & (q_block[:, :, None] >= 0)  # [B, Q, K]
        if composition == "all":
            m = m | same
        elif window is not None:  # "sliding": full layers (window None) stay causal
            m = (causal | same) & in_window
    if key_valid is not None:
        m = m & key_valid[:, None, :]
        # Rows of padding queries would see no key at all and softmax to NaN; let them see
        # themselves (their outputs are never used).
        m = m | (q == k)
    return m[:, None]  # [B or 1, 1, Q, K]
