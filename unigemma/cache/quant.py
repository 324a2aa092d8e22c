"""int8 KV storage: symmetric absmax quantization per token, per KV head, per group of 32 channels.

A cached K or V vector `x` [D] (one token, one KV head) is stored as D int8 codes `round(x / s)`
with one fp16 scale `s = max|x| / 127` per GROUP channels (q8_0's layout: 8.5 bits a value, 53%
of bf16). Per token, so a write never rescales what is already cached: a step quantizes exactly
the tokens it writes, which keeps "a token's output does not depend on how many tokens share its
forward" (models/attention.py) and makes rollback (`trim`) exact.

Why groups of 32 and not one scale per head vector, or per-channel keys (KIVI), measured on
Gemma 3 270M's cache over 2K tokens of text (relative error of the dequantized K / V): one scale
per 256-wide vector 1.5-2.0% / 1.0-1.4% (a few key channels run 25x the median, and set every
channel's step), groups of 32 0.7-0.8% / 0.6-0.8%, per channel over 64-token blocks 0.4-0.5% /
0.6%. Per-channel keys would need a float window of the newest tokens until a block fills, and
a block quantized later than its tokens breaks the forward-size invariant above; groups of 32
get most of the gain per token. A head dim that 32 does not divide gets one scale per vector.

`Int8KV` is what an int8 layer's `cache.update` hands the attention: the codes and scales of
the attended slots, so the read path can dequantize a block of keys at a time instead of the
whole cache (models/attention.py `decode_attention_int8`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GROUP = 32  # channels per scale
SCALE_DTYPE = torch.float16


def group_size(head_dim: int) -> int:
    return GROUP if head_dim % GROUP == 0 else head_dim


def scale_bytes(head_dim: int) -> int:
    """Scale bytes per cached vector of `head_dim` int8 codes."""
    return head_dim // group_size(head_dim) * SCALE_DTYPE.itemsize


class Int8KV(NamedTuple):
    data: torch.Tensor  # int8 [B, H, K, D]
    scale: torch.Tensor  # fp16 [B, H, K, D // group_size(D)]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float tensor the codes stand for ([B, H, K, D] in `dtype`): the plain path."""
        n = self.scale.shape[-1]
        x = self.data.float().unflatten(-1, (n, -1)) * self.scale.float()[..., None]
        return x.flatten(-2).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float → (int8 codes [..., D], fp16 scales [..., D // group]); an all-zero
    group gets scale 0 and codes 0."""
    g = group_size(x.shape[-1])
    xg = x.float().unflatten(-1, (-1, g))
    scale = (xg.abs().amax(-1) / 127).to(SCALE_DTYPE)  # rounded first: the codes divide by what is stored
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    codes = (xg / s).round_().clamp_(-127, 127).flatten(-2)
    return codes.to(torch.int8), scale
