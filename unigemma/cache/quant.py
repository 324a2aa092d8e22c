"""int8 KV storage: symmetric absmax quantization per token and per KV head.

A cached K or V vector `x` [D] (one token, one KV head) is stored as `round(x / s)` in int8 with
its scale `s = max|x| / 127` in fp32 (4 bytes beside D: ~0.5 of a bf16 cache at head dim 256).
Per token, so a write never rescales what is already cached: a step quantizes exactly the
tokens it writes, which keeps "a token's output does not depend on how many tokens share its
forward" (models/attention.py) and makes rollback (`trim`) exact.

`Int8KV` is what an int8 layer's `cache.update` hands the attention: the codes and scales of
the attended slots, so the read path can fold the scales into the scores and probabilities
instead of materialising a float copy (models/attention.py `decode_attention_int8`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Int8KV(NamedTuple):
    data: torch.Tensor  # int8 [B, H, K, D]
    scale: torch.Tensor  # fp32 [B, H, K, 1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float tensor the codes stand for ([B, H, K, D] in `dtype`): the plain path."""
        return (self.data.float() * self.scale).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float → (int8 codes [..., D], fp32 scales [..., 1]); a zero vector gets scale 0."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127
    codes = (xf / scale.clamp(min=torch.finfo(torch.float32).tiny)).round_().clamp_(-127, 127)
    return codes.to(torch.int8), scale
