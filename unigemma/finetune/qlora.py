"""QLoRA: a frozen int8 / int4 base (quant/linear.py) that gradients pass through.

The inference kernels of `QuantLinear` (int8 activations, torch's packed int4 / int8 matmuls)
have no backward. For training each quantized linear (and a quantized tied head) becomes its
`Trainable*` twin, the same module and buffers with one change: the matmul is `_DequantMatmul`,
which dequantizes the weight a block of rows at a time in both passes. The backward computes
only the input's gradient, dY · W, from the codes again (the weight is frozen and no float copy
of it is ever kept for autograd: a saved dequantized weight would cost 4 bytes per parameter
per layer alive). The state dict and names do not change. `make_trainable` is the one entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.kernels import plan
from ..quant.linear import QuantEmbedding, QuantLinear
from ..quant.pack import dequantize

_BLOCK_BYTES = 1 << 22  # float32 weight rows dequantized at a time (4 MiB)


def _blocks(m: QuantLinear):
    rows = max(64, _BLOCK_BYTES // (4 * m.in_features))
    q = m.our_weight()
    for r in range(0, m.out_features, rows):
        yield r, r + rows, q[r:r + rows], m.scales[r:r + rows]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 GEMMs are emulated without AVX512-BF16: run those in float32 (as QuantLinear does)
    return plan().compute_dtype(x.dtype) if x.device.type == "cpu" else x.dtype


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        y = torch.cat([F.linear(xc, dequantize(q, s, module.bits, dtype)) for _, _, q, s in _blocks(module)], -1)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        m = ctx.module
        dtype = _compute_dtype(gy)
        g = gy.to(dtype)
        gx = None
        for a, b, q, s in _blocks(m):
            part = g[..., a:b] @ dequantize(q, s, m.bits, dtype)
            gx = part if gx is None else gx.add_(part)
        return gx.to(gy.dtype), None


class TrainableQuantLinear(QuantLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class TrainableQuantEmbedding(QuantEmbedding):
    def linear(self, h: torch.Tensor) -> torch.Tensor:  # the tied head: gradients reach h
        return _DequantMatmul.apply(h, self)


def make_trainable(model: nn.Module) -> int:
    """Every quantized linear / embedding of `model` to its trainable twin, in place; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is QuantLinear:
            m.__class__ = TrainableQuantLinear
            n += 1
        elif type(m) is QuantEmbedding:
            m.__class__ = TrainableQuantEmbedding
            n += 1
    return n
