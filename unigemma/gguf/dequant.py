"""GGUF tensor bytes → torch tensors: dequantizers for every type we read, and lossless repacks.

Each dequantizer is a vectorised torch port of ggml's reference (`dequantize_row_*`, as
gguf-py's `quants.py` writes it in numpy) with the same float32 operations in the same order,
so results are bit-identical to it (tests/test_gguf.py checks every type on random blocks).
Q8_0 and Q4_0 blocks are exactly our int8 / int4 group-32 layouts (quant/pack.py) with a
float16 scale per 32 values, so `repack` turns them into those layouts without loss.
"""

from __future__ import annotations

import torch

from .types import BF16, F16, F32, Q4_0, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, TYPES

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 little-endian → [n, 1] float32 (via float16, exact)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[n, groups * width] bytes → [n, groups, 2 * width]: low nibbles first, then high."""
    q = qs.reshape(qs.shape[0], groups, 1, width)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(qs.shape[0], groups, 2 * width)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, 2:], 1, 16).reshape(-1, 32).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q5_0(b):
    n = b.shape[0]
    qh = b[:, 2:6].contiguous().view(torch.int32).view(n, 1)  # 32 high bits, little endian
    hi = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
    lo = _nibbles(b[:, 6:], 1, 16).reshape(n, 32)
    q = (lo | (hi << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K / Q5_K → 8 six-bit scales and 8 six-bit mins per block."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 4, 32).float()  # [n, 8 sub-blocks of 32]... as 4 × (32 low, 32 high)
    return (d * q.reshape(n, 8, 32) - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    ql = _nibbles(b[:, 48:], 4, 32).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    lo = _nibbles(ql, 2, 64).reshape(n, 8, 32)
    hi = ((qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3)
    q = (lo | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


_BLOCKS = {Q8_0: _q8_0, Q4_0: _q4_0, Q5_0: _q5_0, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}


def dequantize(raw: torch.Tensor, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """raw uint8 bytes of one tensor → float32 tensor of `shape` (F16/BF16 widen exactly)."""
    if type_id == F32:
        return raw.view(torch.float32).reshape(shape)
    if type_id == F16:
        return raw.view(torch.float16).float().reshape(shape)
    if type_id == BF16:
        return raw.view(torch.bfloat16).float().reshape(shape)
    t = TYPES[type_id]
    return _BLOCKS[type_id](raw.reshape(-1, t.size)).reshape(shape)


def repack(raw: torch.Tensor, type_id: int, shape: tuple[int, ...]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Q8_0 / Q4_0 [N, K] → (bits, q, float16 scales [N, K // 32]) in our layouts, exactly."""
    N, K = shape
    b = raw.reshape(N, K // 32, TYPES[type_id].size)
    scales = b[..., :2].contiguous().view(torch.float16).reshape(N, K // 32)
    if type_id == Q8_0:
        return 8, b[..., 2:].contiguous().view(torch.int8).reshape(N, K), scales
    if type_id != Q4_0:
        raise ValueError(f"{TYPES[type_id].name} has no lossless repack")
    # ggml: byte j of a block holds value j (low nibble) and value j + 16 (high nibble)
    u = _nibbles(b[..., 2:].reshape(-1, 16), 1, 16).reshape(N, K)
    return 4, u[:, 0::2] | (u[:, 1::2] << 4), scales
