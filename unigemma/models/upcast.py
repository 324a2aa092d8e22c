"""bf16 weights on a CPU without bf16 arithmetic (AVX2: no AVX512-BF16 / AMX), where oneDNN
refuses to pack them (models/packed.py) and torch's bf16 GEMM is emulated: ~0.6 GB/s for a
64-row prefill against float32's ~8 (bench/quant_kernels.py, AVX2), and its backward (dy W, the
weight not transposed) ~100x slower than float32 (0.36 against 66 GFLOP/s, 512 x 6144 x 1536).

`UpcastLinear` keeps the bf16 weight (memory stays 2 bytes a weight) and runs up to `MAX_ROWS`
rows (decode steps, a short verify) as plain `F.linear` in bf16 — reading 2 bytes a weight is what
decoding costs, and each extra row costs about one more (capped to AVX2: 0.76 ms at one row, the
upcast path 1.6–2.7 ms, 8192×1536) — while more rows (prefill) upcast a block of ~1 MiB of weight
rows at a time to float32 and run float32 GEMMs, rounding the output to bf16 once. `upcast_linears(model)` swaps the
decoder's Linears for it after loading, where quant/kernels.py's plan says "upcast".

Training (the fine-tuning loop, a frozen weight) goes through `upcast_matmul`, an autograd
function whose backward dx = dy W upcasts the same blocks again instead of keeping a float32
copy of W from the forward: the loss head (a 262,144-row tied embedding) uses it too
(finetune/loss.py). The plain fallback is `F.linear` in bf16, as everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BLOCK_BYTES = 1 << 20
MAX_ROWS = 4  # bf16 F.linear up to here; the float32 GEMMs above


def _blocks(weight: torch.Tensor, block_bytes: int):
    """(row slice, float32 copy of those weight rows), ~block_bytes of float32 at a time, each
    valid until the next is drawn. One buffer serves every block: a fresh buffer per block is a
    fresh mapping to page-fault during a training step (finetune/train.py maps buffers from
    256 KiB), which made the upcast cost 4x its copy."""
    n, k = weight.shape
    rows = min(n, max(64, block_bytes // (4 * k)))
    buf = torch.empty(rows, k, dtype=torch.float32, device=weight.device)
    for r in range(0, n, rows):
        m = min(rows, n - r)
        yield slice(r, r + m), buf[:m].copy_(weight[r:r + m])


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_bytes: int) -> torch.Tensor:
    """x Wᵀ + b in float32 GEMMs over upcast weight blocks, rounded to x's dtype once."""
    x32 = x.float()
    outs = [F.linear(x32, w) for _, w in _blocks(weight, block_bytes)]
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class _UpcastMatmul(torch.autograd.Function):
    """y = x Wᵀ for a frozen bf16 W; backward dx = Σ_blocks dy[:, block] W[block], each block
    upcast again (nothing but W itself is kept between forward and backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                block_bytes: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.block_bytes = block_bytes
        return _forward(x, weight, bias, block_bytes)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (weight,) = ctx.saved_tensors
        dy32 = dy.float().reshape(-1, weight.shape[0])
        dx = dy32.new_zeros(dy32.shape[0], weight.shape[1])
        for rows, w in _blocks(weight, ctx.block_bytes):
            dx.addmm_(dy32[:, rows], w)  # accumulated in place: no product tensor per block
        return dx.reshape(*dy.shape[:-1], weight.shape[1]).to(dy.dtype), None, None, None


def upcast_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  block_bytes: int = _BLOCK_BYTES) -> torch.Tensor:
    """x Wᵀ + b through float32 GEMMs on upcast blocks of W (bf16), differentiable in x only. A W
    or b that trains takes the plain bf16 `F.linear` (their gradients need the full product)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _UpcastMatmul.apply(x, weight, bias, block_bytes)
    return _forward(x, weight, bias, block_bytes)


class UpcastLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameter: the state dict keeps its names
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= MAX_ROWS * x.shape[-1]:  # a few rows: the weight read in its own dtype
            return F.linear(x, self.weight, self.bias)
        return upcast_matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def upcast_linears(model: nn.Module) -> nn.Module:
    """Swap the decoder's bf16 nn.Linear modules for UpcastLinear, in place."""
    for module in list(model.text.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(module, name, UpcastLinear(child))
    return model
