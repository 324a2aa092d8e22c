"""bf16 weights on a CPU without bf16 arithmetic (AVX2: no AVX512-BF16 / AMX), where oneDNN
refuses to pack them (models/packed.py) and torch's bf16 GEMM is emulated: ~0.6 GB/s for a
64-row prefill against float32's ~8 (bench/quant_kernels.py, AVX2).

`UpcastLinear` keeps the bf16 weight (memory stays 2 bytes a weight) and runs up to `MAX_ROWS`
rows (decode steps, a short verify) as plain `F.linear` in bf16 — reading 2 bytes a weight is what
decoding costs, and each extra row costs about one more (capped to AVX2: 0.76 ms at one row, the
upcast path 1.6–2.7 ms, 8192×1536) — while more rows (prefill) upcast a block of ~1 MiB of weight
rows at a time to float32 and run float32 GEMMs, rounding the output to bf16 once. `upcast_linears(model)` swaps the
decoder's Linears for it after loading, where quant/kernels.py's plan says "upcast".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BLOCK_BYTES = 1 << 20
MAX_ROWS = 4  # bf16 F.linear up to here; the float32 GEMMs above


class UpcastLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same parameter: the state dict keeps its names
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= MAX_ROWS * x.shape[-1]:  # a few rows: the weight read in its own dtype
            return F.linear(x, self.weight, self.bias)
        x32 = x.float()
        rows = max(64, _BLOCK_BYTES // (4 * self.in_features))
        outs = [F.linear(x32, self.weight[r:r + rows].float()) for r in range(0, self.out_features, rows)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def upcast_linears(model: nn.Module) -> nn.Module:
    """Swap the decoder's bf16 nn.Linear modules for UpcastLinear, in place."""
    for module in list(model.text.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(module, name, UpcastLinear(child))
    return model
