"""torch's CPU int4 kernel layout, learned from the kernel's own conversion op.

`_weight_int4pack_mm_for_cpu` reads its weight in the order `_convert_weight_to_int4pack_for_cpu`
writes it, and that order depends on the ISA torch dispatches to (and so on
`ATEN_CPU_CAPABILITY`): blocks of 64 rows on AVX-512, of 32 on AVX2, row pairs on the plain
build, and a torch release may change it again. Nothing here assumes one: the first call packs
probe matrices whose nibbles spell out their own row numbers, and the order is read off the op's
output. Every layout torch has written so far has the same shape —

    blocks of B rows; per block and column k, B / 2 bytes, byte j holding row lo[j] of the
    block in its low nibble and row hi[j] in its high nibble —

so B, lo and hi are what is learned. The learned layout is then checked against the op on random
weights of other shapes; if the op wrote anything this shape cannot express, `kernel_layout()`
is None and the int4 modules take the dequantize path (slower, never wrong).

Knowing the order, rather than only calling the op, lets a module keep just the kernel's copy of
its weight and still write our layout back out (a state_dict hook), and packs from our uint8
layout without the op's int32 [N, K] input (4 bytes a weight, 8x the packed size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .pack import pack_nibbles, unpack_nibbles

# The row count a module needs for the kernel: a multiple of every block size torch has used, so
# which modules take the kernel does not depend on the CPU the process runs on.
ROW_MULTIPLE = 64


@dataclass(frozen=True)
class Int4KernelLayout:
    block: int  # B: rows per block
    lo: tuple[int, ...]  # [B / 2]: the block row in byte j's low nibble
    hi: tuple[int, ...]  # [B / 2]: the block row in byte j's high nibble

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Our int4 layout [N, K // 2] (pack.py) → the kernel's (N a multiple of `block`)."""
        u = unpack_nibbles(q)
        N, K = u.shape
        b = u.reshape(N // self.block, self.block, K).transpose(1, 2)  # [N / B, K, B]
        lo, hi = b[..., list(self.lo)], b[..., list(self.hi)]
        return (lo | (hi << 4)).reshape(N, K // 2).contiguous()

    def unpack(self, p: torch.Tensor) -> torch.Tensor:
        """The kernel's layout → ours (the inverse of `pack`)."""
        N, K = p.shape[0], p.shape[1] * 2
        seg = p.reshape(N // self.block, K, self.block // 2)
        b = torch.empty(N // self.block, K, self.block, dtype=torch.uint8, device=p.device)
        b[..., list(self.lo)], b[..., list(self.hi)] = seg & 15, seg >> 4
        return pack_nibbles(b.transpose(1, 2).reshape(N, K))


def convert(u: torch.Tensor) -> torch.Tensor:
    """torch's own conversion: values 0..15 [N, K] → the kernel's packed bytes [N, K // 2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.int().contiguous(), 1)


@functools.cache
def kernel_layout() -> Int4KernelLayout | None:
    """The layout of the int4 kernel torch dispatches to in this process, or None when it
    cannot be learned (no such op, or an order of another shape)."""
    try:
        return _learn()
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def _learn() -> Int4KernelLayout | None:
    N, K = 256, 4
    rows = torch.arange(N).unsqueeze(1).expand(N, K)
    low_digit, high_digit = convert(rows % 16).reshape(-1), convert(rows // 16).reshape(-1)
    lo_rows = (low_digit & 15) + 16 * (high_digit & 15)  # the row in byte i's low nibble
    hi_rows = (low_digit >> 4) + 16 * (high_digit >> 4)
    for B in (2, 4, 8, 16, 32, 64):  # up to ROW_MULTIPLE: the modules' rows fill whole blocks
        lo, hi = lo_rows[:B // 2].tolist(), hi_rows[:B // 2].tolist()
        if sorted(lo + hi) != list(range(B)):
            continue
        layout = Int4KernelLayout(B, tuple(lo), tuple(hi))
        if _agrees(layout):
            return layout
    return None


def _agrees(layout: Int4KernelLayout) -> bool:
    g = torch.Generator().manual_seed(0)
    for N, K in ((256, 4), (ROW_MULTIPLE, 96), (3 * ROW_MULTIPLE, 34)):
        u = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        ours = pack_nibbles(u)
        packed = convert(u)
        if not torch.equal(layout.pack(ours), packed) or not torch.equal(layout.unpack(packed), ours):
            return False
    return True
