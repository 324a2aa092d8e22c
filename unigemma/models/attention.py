"""Gemma 4 self-attention: q/k norms with weights, v norm without, scale 1.0, K=V on full layers.

    q = rope(q_norm(q_proj(x)))
    k = rope(k_norm(k_proj(x)))
    v = v_norm(v_proj(x))          sliding layers
    v = v_norm(k_proj(x))          full layers with attention_k_eq_v: the raw K projection,
                                   before k_norm and RoPE, so K and V still differ
    out = o_proj(softmax(q kᵀ + mask) v)   no 1/sqrt(d): the q/k norms take its place

`attend` is the attention op of every family and the MTP drafter: PyTorch SDPA (fp32
accumulation), the reference's default backend, or, for a few new tokens (decode, verifying
drafts), `decode_attention`: the same math as two small matmuls in fp32, on CPU ~9x faster than
SDPA's flash kernel for one query (0.1 vs 0.9 ms per layer at head dim 256 and 520 keys),
equal to it to rounding. It owns the fast / oracle switch and every padding rule that keeps a
token's output independent of how many tokens share its forward (its docstring lists them).
An int8 KV cache hands it `Int8KV` codes and scales (cache/quant.py): decode steps read them
as stored (`decode_attention_int8`: quant/qdot.c's int8 kernels, torch ops where it is not
built), everything else dequantizes and attends as above.
This file knows nothing of caches' layout or of any family but Gemma 4's projections.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.quant import Int8KV
from ..config import SLIDING, TextConfig
from ..quant import qdot
from .layers import RMSNorm, rms_norm
from .rope import apply_rope


FAST_DECODE = True  # False: SDPA for every step (the oracle the tests compare against)
# False: an int8 cache is dequantized to the model's dtype and attended like a float one (the
# plain path the tests compare `decode_attention_int8` against)
INT8_FAST = True
INT8_KEY_CHUNK = 1024  # keys dequantized to fp32 at a time by decode_attention_int8 (1 MiB per KV head at dim 256)
# Attention weights below this count as 0 in decode steps. Over a long context most weights of a
# peaked softmax are subnormal floats, and every multiply-add with one takes a microcode assist:
# p @ v at 32K keys ran 15x slower on random K/V. Dropped weights change an output by under
# 1e-20 x (number of keys) x max |v|, far below fp32's rounding.
P_FLOOR = 1e-20


DECODE_QUERIES = 16  # steps of up to this many tokens per row (decode, verifying drafts) use decode_attention
MIN_ROWS = 8  # rows per KV head of decode_attention's matmuls: below this the GEMM kernel sums in another order
MIN_QUERIES = 4  # bf16 SDPA calls get at least this many queries: below, PyTorch's CPU kernel sums in another order


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float = 1.0,
           use_decode_kernel: bool = True) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v: q [B, H, S, D], k/v [B, KV, K, D] (GQA when KV < H), mask
    [B|1, 1, S, K] bool → [B, H, S, D]. The one attention op of every family and the drafter.

    The invariant: a token's output does not depend on how many tokens share its forward. A
    one-token decode step, the same token verified among drafts, and the same row inside a
    decode batch give the same bits, so speculative and batched greedy decoding reproduce plain
    decoding exactly. CPU kernels pick their summation order by problem size, so it is kept by
    padding every size-dependent call up to a size where the order no longer changes:
      * here, steps of ≤ DECODE_QUERIES queries (when FAST_DECODE and `use_decode_kernel`) run
        as two fp32 matmuls (`decode_attention`) with the queries padded to MIN_ROWS rows per
        KV head; on CPU that is also ~9x faster than SDPA's flash kernel for one query;
      * here, other bf16 SDPA calls get at least MIN_QUERIES queries (the last one repeated);
      * cache/kv.py KEY_BLOCK: the number of keys a step sees is rounded up to a block, so it
        does not depend on how many tokens the step appends;
      * models/packed.py: a lone bf16 row goes through oneDNN's linear as two rows.
    use_decode_kernel=False keeps a family on SDPA at every size (Gemma 3: its parity with the
    references was established on SDPA's rounding). The padded rows are dropped before return.

    k, v may be `Int8KV` (an int8 cache): with INT8_FAST, steps of ≤ DECODE_QUERIES queries run
    `decode_attention_int8` whatever `use_decode_kernel` says (a quantized cache has no
    reference rounding to keep; the same padding rules hold); other steps dequantize first.
    """
    if isinstance(k, Int8KV):
        if INT8_FAST and q.shape[2] <= DECODE_QUERIES:
            return decode_attention_int8(q, k, v, mask, scale)
        k, v = k.dequantize(q.dtype), v.dequantize(q.dtype)
    if use_decode_kernel and FAST_DECODE and q.shape[2] <= DECODE_QUERIES:
        return decode_attention(q, k, v, mask, scale)
    return sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, scale)  # (.to: a bf16 cache under an fp32 model)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """PyTorch SDPA (fp32 accumulation), bf16 calls padded to MIN_QUERIES queries (see `attend`)."""
    S, gqa = q.shape[2], k.shape[1] != q.shape[1]
    if q.dtype != torch.bfloat16 or S >= MIN_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    pad = MIN_QUERIES - S
    q = torch.cat([q, q[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    if mask is not None and mask.shape[2] == S:
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)[:, :, :S]


def _stacked_queries(q: torch.Tensor, mask: torch.Tensor, KV: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The query heads sharing a KV head as rows of one fp32 matrix [B, KV, G * n, D], each
    head's S queries padded (repeating the last one, mask too) to n >= MIN_ROWS / G rows."""
    B, H, S, D = q.shape
    G = H // KV
    n = max(S, -(-MIN_ROWS // G))
    if n > S:
        q = torch.cat([q, q[:, :, -1:].expand(-1, -1, n - S, -1)], 2)
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, n - S, -1)], 2)
    return q.reshape(B, KV, G * n, D).float(), mask, n


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
    """A few queries per row: q [B, H, S, D], k/v [B, KV, K, D], mask [B|1, 1, S, K] -> [B, H, S, D].

    The query heads sharing a KV head are stacked as rows of one matmul (GQA without repeat),
    padded (repeating the last query) to MIN_ROWS rows per KV head (see `attend`).
    """
    B, H, S, D = q.shape
    KV = k.shape[1]
    G = H // KV
    qg, mask, n = _stacked_queries(q, mask, KV)
    scores = torch.matmul(qg, k.transpose(-1, -2).float()).view(B, KV, G, n, -1)
    if scale != 1.0:  # Gemma 4's q/k norms take the place of 1/sqrt(d): no multiply there
        scores = scores * scale
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    p = scores.softmax(-1).view(B, KV, G * n, -1)
    out = torch.matmul(p.masked_fill(p < P_FLOOR, 0.0), v.float())  # [B, KV, G*n, D] (not in place: autograd)
    return out.view(B, KV, G, n, D)[:, :, :, :S].reshape(B, H, S, D).to(q.dtype)


def decode_attention_int8(q: torch.Tensor, k: Int8KV, v: Int8KV, mask: torch.Tensor,
                          scale: float = 1.0) -> torch.Tensor:
    """`decode_attention` over int8 codes: q [B, H, S, D], k/v codes [B, KV, K, D] with their
    scales (cache/quant.py), mask [B|1, 1, S, K] -> [B, H, S, D].

    Where quant/qdot.c is built and the head dim is a multiple of 32, the cache is read as it is
    stored: q kᵀ as int8 dot products (the queries quantized per 32 channels, as llama.cpp's
    q8_0 cache does) and p v as fused multiply-adds over codes converted a cache-sized block at a
    time (`qdot.kv_scores` / `kv_values`); each query row's result is independent of the rows
    beside it, so no padding is needed. Elsewhere `_int8_blocks` (torch ops) runs.
    """
    if not (qdot.kv_fits(k.data, k.scale) and qdot.kv_fits(v.data, v.scale)):
        return _int8_blocks(q, k, v, mask, scale)
    B, H, S, D = q.shape
    KV, K = k.data.shape[1], k.data.shape[2]
    G = H // KV
    scores = qdot.kv_scores(q.reshape(B, KV, G * S, D), k.data, k.scale)  # heads of a KV head stacked
    if scale != 1.0:  # Gemma 4's q/k norms take the place of 1/sqrt(d): no multiply there
        scores = scores * scale
    scores = scores.view(B, KV, G, S, K).masked_fill(~mask[:, :, None], float("-inf"))
    p = scores.softmax(-1).view(B, KV, G * S, K)
    out = qdot.kv_values(p.masked_fill_(p < P_FLOOR, 0.0), v.data, v.scale)  # [B, KV, G*S, D]
    return out.view(B, H, S, D).to(q.dtype)


def _int8_blocks(q: torch.Tensor, k: Int8KV, v: Int8KV, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`decode_attention_int8` in torch ops: keys and values dequantized to fp32 INT8_KEY_CHUNK
    slots at a time, each chunk feeding one matmul, so no float copy of the whole cache is made
    (the plain path makes one in the model's dtype, and `decode_attention` another in fp32). The
    chunking depends on the key count only (a whole number of KEY_BLOCKs), so the sums keep the
    same order whatever the number of queries.
    """
    B, H, S, D = q.shape
    KV, K = k.data.shape[1], k.data.shape[2]
    G = H // KV
    qg, mask, n = _stacked_queries(q, mask, KV)
    chunks = [slice(c, c + INT8_KEY_CHUNK) for c in range(0, K, INT8_KEY_CHUNK)]

    def block(x: Int8KV, c: slice) -> torch.Tensor:
        return Int8KV(x.data[:, :, c], x.scale[:, :, c]).dequantize(torch.float32)

    scores = torch.cat([torch.matmul(qg, block(k, c).transpose(-1, -2)) for c in chunks], -1)  # [B, KV, G*n, K]
    if scale != 1.0:
        scores = scores * scale
    scores = scores.view(B, KV, G, n, K).masked_fill(~mask[:, :, None], float("-inf"))
    p = scores.softmax(-1).view(B, KV, G * n, K)
    p = p.masked_fill(p < P_FLOOR, 0.0)
    out = None
    for c in chunks:
        part = torch.matmul(p[..., c], block(v, c))
        out = part if out is None else out.add_(part)
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
        out = attend(q, k, v, mask, scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
