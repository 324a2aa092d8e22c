"""Weight-only quantization arithmetic: quantize, dequantize, and the int4 nibble layouts.

Our layouts (what quantized checkpoints store, and what GGUF Q8_0 / Q4_0 repack into):
  int8: q int8 [N, K], w = q * s                  s float16 [N, K // g] (g = K: per channel)
  int4: q uint8 [N, K // 2], low nibble = column 2i, high nibble = column 2i + 1,
        values u in 0..15, w = (u - 8) * s        s float16 [N, K // g]

The rounding follows ggml's reference quantizers (as gguf-py writes them) bit for bit:
int8 scales are amax / 127 with q = round-half-away(w / s); int4 scales are the signed
value of largest magnitude / -8 with u = trunc(w / s + 8.5) clipped to 15. Scales are
computed in float32 and stored as float16, exactly as Q8_0 / Q4_0 blocks store them, so
quantizing with g = 32 reproduces llama.cpp's Q8_0 / Q4_0 files. Dequantization is float32
math (the reference for every kernel), cast to the requested dtype at the end.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in-features {K} are not a multiple of the group size {group_size}")
    return w.float().reshape(N, K // group_size, group_size)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    # 1 / d with 0 for all-zero groups (ggml: id = d ? 1/d : 0)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _scales_f16(d: torch.Tensor) -> torch.Tensor:
    if bool((d.abs() > FP16_MAX).any()):
        raise ValueError("a weight group's scale exceeds the float16 range (weights above ~8e6)")
    return d.squeeze(-1).to(torch.float16)


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (q int8 [N, K], scales float16 [N, K // g]); g None: per output channel."""
    g = _groups(w, group_size or w.shape[1])
    d = g.abs().amax(-1, keepdim=True) / 127
    x = g * _inverse(d)
    a = x.abs()
    fl = a.floor()
    q = torch.sign(x) * (fl + (2 * (a - fl)).floor())  # round half away from zero, as ggml's roundf
    return q.to(torch.int8).reshape(w.shape), _scales_f16(d)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (q uint8 [N, K // 2] packed nibbles, scales float16 [N, K // g])."""
    g = _groups(w, group_size)
    i = g.abs().argmax(-1, keepdim=True)
    d = g.gather(-1, i) / -8  # the extreme value maps to -8 exactly, its opposite side to <= 7
    u = torch.trunc(g * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return pack_nibbles(u.reshape(w.shape)), _scales_f16(d)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """u uint8 [N, K] in 0..15 → [N, K // 2]: column 2i low nibble, 2i + 1 high nibble."""
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] → uint8 [N, K] in 0..15 (inverse of pack_nibbles)."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """Our layout → w [N, K] in `dtype` (computed in float32)."""
    if bits == 8:
        v = q.float()
    else:  # nibbles straight into float32 slots: 2x faster than unpack_nibbles(q).float()
        v = torch.empty(q.shape[0], q.shape[1], 2)
        v[..., 0], v[..., 1] = q & 15, q >> 4
        v = v.view(q.shape[0], -1).sub_(8)
    N, K = v.shape
    G = scales.shape[1]
    return (v.reshape(N, G, K // G) * scales.float()[..., None]).reshape(N, K).to(dtype)

