"""A tiny mock model for engine and scheduler tests: no weights, a next-token rule you can
compute by hand, and the real KV caches underneath.

The model speaks the protocol of models/ (`model(ids, positions, *, cache=..., embeds=...)` ->
hidden [B, S, hidden], `head`, `embed`, `make_cache`, `.config`, `.dtype`, `.device`). It has
one sliding layer and one full layer whose "keys" are the token ids themselves; a query's
attention is the sum of the ids it may see. So the next token depends on the whole history
through the cache (a row's slots, rings, rollback, a row moved by the batch), and `next_token`
gives it from the plain list of ids:

    next = (3 * sum(all ids) + 5 * sum(last WINDOW ids) + position of the last id) % VOCAB

The hidden state is already the logits (`head` is the identity): a peak at `next`, falling off
with the distance, so sampling at a temperature has a spread to draw from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unigemma.cache.kv import RESERVE, KVCache
from unigemma.config import FULL, SLIDING

VOCAB = 48
WINDOW = 4
EOS = 1  # the tokenizer's end of turn: the rule produces it now and then


@dataclass
class MockTextConfig:
    vocab_size: int = VOCAB
    hidden_size: int = VOCAB
    sliding_window: int = WINDOW
    max_position_embeddings: int = 256
    pad_token_id: int = 0
    layer_types: list = field(default_factory=lambda: [SLIDING, FULL])
    layer_kv_heads: list = field(default_factory=lambda: [1, 1])
    layer_head_dims: list = field(default_factory=lambda: [1, 1])


@dataclass
class MockConfig:
    text: MockTextConfig = field(default_factory=MockTextConfig)
    image_token_id: int = VOCAB  # outside the vocabulary: no prompt or reply holds media
    video_token_id: int = VOCAB + 1
    audio_token_id: int = VOCAB + 2
    stop_token_ids: list = field(default_factory=lambda: [EOS])


def next_token(ids: list[int]) -> int:
    """The rule, on the host: the greedy token after `ids` (a conversation's whole history)."""
    return (3 * sum(ids) + 5 * sum(ids[-WINDOW:]) + len(ids) - 1) % VOCAB


def greedy_reference(prompt: list[int], n: int, stop: set[int] = frozenset()) -> list[int]:
    """What greedy decoding must produce: n tokens (fewer if a stop id comes)."""
    ids, out = list(prompt), []
    for _ in range(n):
        t = next_token(ids)
        out.append(t)
        ids.append(t)
        if t in stop:
            break
    return out


class MockModel(torch.nn.Module):
    def __init__(self, context: int = 256):
        super().__init__()
        self.config = MockConfig(text=MockTextConfig(max_position_embeddings=context))
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.forwards = 0  # how many forwards ran (prefill chunks and decode steps)

    def make_cache(self, batch: int, max_len: int, reserve: int = RESERVE, kv_dtype: str = "auto",
                   quant_layers: str | None = None) -> KVCache:
        return KVCache(self.config.text, batch, max_len, self.dtype, self.device, reserve, kv_dtype, quant_layers)

    def embed(self, input_ids: torch.Tensor, require_media: bool = True, **media) -> torch.Tensor:
        return input_ids.to(self.dtype)[..., None]  # [B, S, 1]: the id itself

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, input_ids, positions, *, attention_mask=None, mm_token_type_ids=None, cache=None,
                block_mask=None, require_media=True, embeds=None, **media) -> torch.Tensor:
        self.forwards += 1
        x = (embeds if embeds is not None else self.embed(input_ids))[..., 0]  # [B, S]
        B, S = input_ids.shape
        valid = torch.ones(B, S, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if cache is None:
            sums = [self._attend(x, torch.arange(S), valid, torch.arange(S), t) for t in (SLIDING, FULL)]
        else:
            steps = cache.begin(valid)
            q = cache.query_index(S)
            sums = []
            for layer, t in enumerate(self.config.text.layer_types):
                kv = x[:, None, :, None]  # [B, 1 head, S, 1 dim]
                keys, _ = cache.update(layer, kv, kv)
                sums.append(self._attend(keys[:, 0, :, 0], steps[t].k_idx, steps[t].k_valid, q, t))
            cache.end()
        nxt = (3 * sums[1] + 5 * sums[0] + positions.to(torch.long)) % VOCAB  # [B, S]
        return -(torch.arange(VOCAB) - nxt[..., None]).abs().to(self.dtype)

    def _attend(self, keys, k_idx, k_valid, q_idx, layer_type) -> torch.Tensor:
        """Sum of the key ids each query sees: causal, windowed on the sliding layer."""
        if k_idx.dim() == 1:
            k_idx = k_idx.expand(keys.shape[0], -1)
        if q_idx.dim() == 1:
            q_idx = q_idx.expand(keys.shape[0], -1)
        k_valid = torch.ones_like(k_idx, dtype=torch.bool) if k_valid is None else k_valid
        seen = (k_idx[:, None, :] >= 0) & (k_idx[:, None, :] <= q_idx[:, :, None]) & k_valid[:, None, :]
        if layer_type == SLIDING:
            seen &= k_idx[:, None, :] > q_idx[:, :, None] - WINDOW
        return (keys.round().long()[:, None, :] * seen).sum(-1)  # [B, S]


class MockTokenizer:
    """Token i is the letter chr(ord('a') + i % 26); EOS ends a turn."""
    eos_ids = [EOS]
    pad_id = 0

    def token_bytes(self, token_id: int) -> bytes:
        return chr(ord("a") + token_id % 26).encode()

    def is_special(self, token_id: int) -> bool:
        return token_id == EOS

    def decode(self, ids) -> str:
        return "".join(self.token_bytes(i).decode() for i in ids)
