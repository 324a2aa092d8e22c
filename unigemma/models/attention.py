"""Gemma 4 self-attention: q/k norms with weights, v norm without, scale 1.0, K=V on full layers.

    q = rope(q_norm(q_proj(x)))
    k = rope(k_norm(k_proj(x)))
    v = v_norm(v_proj(x))          sliding layers
    v = v_norm(k_proj(x))          full layers with attention_k_eq_v: the raw K projection,
                                   before k_norm and RoPE, so K and V still differ
    out = o_proj(softmax(q kᵀ + mask) v)   no 1/sqrt(d): the q/k norms take its place

The attention op is PyTorch SDPA (fp32 accumulation), the reference's default backend.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, TextConfig
from .layers import RMSNorm, rms_norm
from .rope import apply_rope


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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
