"""Gemma 4 self-attention: q/k norms with weights, v norm without, scale 1.0, K=V on full layers.

    q = rope(q_norm(q_proj(x)))
    k = rope(k_norm(k_proj(x)))
    v = v_norm(v_proj(x))          sliding layers
    v = v_norm(k_proj(x))          full layers with attention_k_eq_v: the raw K projection,
                                   before k_norm and RoPE, so K and V still differ
    out = o_proj(softmax(q kᵀ + mask) v)   no 1/sqrt(d): the q/k norms take its place

The attention op is PyTorch SDPA (fp32 accumulation), the reference's default backend. For a
few new tokens (decode, or verifying drafts) `decode_attention` does the same math as two small
matmuls in fp32: on CPU that is ~9x faster than SDPA's flash kernel for one query (0.1 vs 0.9
ms per layer at head dim 256 and 520 keys) and agrees with it to rounding.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, TextConfig
from .layers import RMSNorm, rms_norm
from .rope import apply_rope


FAST_DECODE = True  # False: SDPA for every step (the oracle the tests compare against)


DECODE_QUERIES = 16  # steps of up to this many tokens per row (decode, verifying drafts) use decode_attention
MIN_ROWS = 8  # rows per KV head of its matmuls: below this the GEMM kernel sums in another order


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A few queries per row: q [B, H, S, D], k/v [B, KV, K, D], mask [B|1, 1, S, K] -> [B, H, S, D].

    The query heads sharing a KV head are stacked as rows of one matmul (GQA without repeat).
    The queries are padded (repeating the last) to at least MIN_ROWS rows per KV head: then a
    query's result does not depend on how many share the call, so a one-token step is bit-equal
    to the same token verified among drafts (with the key count fixed by cache/kv.py KEY_BLOCK).
    """
    B, H, S, D = q.shape
    KV = k.shape[1]
    G = H // KV
    n = max(S, -(-MIN_ROWS // G))
    if n > S:
        q = torch.cat([q, q[:, :, -1:].expand(-1, -1, n - S, -1)], 2)
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, n - S, -1)], 2)
    qg = q.reshape(B, KV, G * n, D).float()
    scores = torch.matmul(qg, k.transpose(-1, -2).float()).view(B, KV, G, n, -1)  # scale 1.0
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    out = torch.matmul(scores.softmax(-1).view(B, KV, G * n, -1), v.float())  # [B, KV, G*n, D]
    return out.view(B, KV, G, n, D)[:, :, :, :S].reshape(B, H, S, D).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = config.layer_types[layer_idx] == SLIDING
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.layer_kv_heads[layer_idx]
        self.head_dim = config.layer_head_dims[layer_idx]
        self.eps = config.rms_norm_eps
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias) if config.uses_v_proj(layer_idx) else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, self.eps)
        self.k_norm = RMSNorm(self.head_dim, self.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, -1, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(B, S, -1, self.head_dim)
        v_raw = self.v_proj(x).view(B, S, -1, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        v = rms_norm(v_raw, None, self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if S <= DECODE_QUERIES and FAST_DECODE:
            out = decode_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
