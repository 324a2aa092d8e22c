"""Quantized Linear and Embedding modules: int8 / int4 weights, activations in the model dtype.

State (what a quantized checkpoint stores, layouts in pack.py):
    weight  int8 [N, K] (8 bit) or uint8 [N, K // 2] (4 bit)
    scales  float16 [N, K // group]

Each module runs one matmul path, `path`, chosen once for this CPU by quant/kernels.py
(`CpuPlan.quantized`; `prepare` sets it after loading, else it is chosen at the first call):
  "int8-act"    qdot.c: int8 activations x the int8 / int4 codes in our layout (llama.cpp's way).
  "int8pack"    torch's `_weight_int8pack_mm`: per-channel int8, bf16 activations.
  "int4pack"    torch's `_weight_int4pack_mm_for_cpu`: group-wise int4 with N % 64 == 0. The
                module then keeps only the kernel's nibble order in memory (a permutation of ours
                that depends on the CPU, learned from torch's conversion op in cpu_int4.py, and
                undone by a state_dict hook), so the weight exists once. These two take scales in
                the activation dtype: the float16 scales round to bfloat16 (2^-9 per group).
  "dequantize"  plain dequantize + matmul, a block of rows at a time so the float copy stays in
                cache, in float32 where bf16 is emulated: odd shapes, other devices, the oracle,
                and every call with more rows than the path's kernel takes (prefill, MAX_ROWS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import qdot
from .cpu_int4 import kernel_layout
from .kernels import MAX_ROWS, plan
from .pack import dequantize

USE_KERNELS = True  # False: every module takes the dequantize path (tests compare the two)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# rows dequantized per block on the plain path: ~1 MiB of float32 weights
_BLOCK_BYTES = 1 << 20


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 bias: bool = False, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        g = group_size or in_features
        if in_features % g or (bits == 4 and g % 2):
            raise ValueError(f"in-features {in_features} do not split into groups of {g}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, g
        wshape = (out_features, in_features if bits == 8 else in_features // 2)
        self.register_buffer("weight", torch.empty(wshape, dtype=torch.int8 if bits == 8 else torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // g, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.is_kernel_layout = False  # weight holds torch's int4 kernel order (see pack.py)
        self.path: str | None = None  # the kernel, chosen once (choose_path); None: at the first call
        self._kernel_scales: dict[torch.dtype, torch.Tensor] = {}
        self._register_state_dict_hook(_our_layout_hook)

    def choose_path(self, dtype: torch.dtype, exact: bool = False) -> str:
        """Set and return this module's kernel for `dtype` activations on this CPU (kernels.py)."""
        if self.weight.device.type != "cpu":
            self.path = "dequantize"
        else:
            self.path = plan().quantized(self.bits, self.group_size, self.in_features, self.out_features, dtype, exact)
        return self.path

    def set_weight(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Our layout in (from a checkpoint, a quantizer or a GGUF repack)."""
        if tuple(q.shape) != tuple(self.weight.shape) or tuple(scales.shape) != tuple(self.scales.shape):
            raise ValueError(f"quantized weight {tuple(q.shape)} / scales {tuple(scales.shape)} do not fit "
                             f"{tuple(self.weight.shape)} / {tuple(self.scales.shape)}")
        self.weight, self.scales = q.to(self.weight.dtype).contiguous(), scales.to(torch.float16).contiguous()
        self.is_kernel_layout = False
        self._kernel_scales.clear()

    def our_weight(self) -> torch.Tensor:
        return kernel_layout().unpack(self.weight) if self.is_kernel_layout else self.weight

    def to_kernel_layout(self) -> None:
        """Move an int4 weight into the CPU kernel's order, once (the kernel path calls this)."""
        if not self.is_kernel_layout:
            self.weight, self.is_kernel_layout = kernel_layout().pack(self.weight), True

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight [N, K] these bits stand for (the reference for every path)."""
        return dequantize(self.our_weight(), self.scales, self.bits, dtype)

    def _scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._kernel_scales.get(dtype)
        if s is None:
            if self.bits == 8:
                s = self.scales[:, 0].to(dtype)
            else:  # [K // g, N, 2]: scale and an additive zero (0: symmetric)
                sc = self.scales.t().to(dtype)
                s = torch.stack([sc, torch.zeros_like(sc)], dim=-1).contiguous()
            self._kernel_scales[dtype] = s
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        path = self.path or self.choose_path(x.dtype)
        if not USE_KERNELS or x2.shape[0] > MAX_ROWS.get(path, 0):
            path = "dequantize"
        if x.requires_grad and torch.is_grad_enabled():
            # QLoRA: the kernels have no backward; the input's gradient goes through the dequantized
            # weight, recomputed in backward rather than saved (the frozen weight gets none)
            y = _DequantizeMatmul.apply(x2, self)
        elif path == "int8-act":
            y = qdot.linear_op(x2, self.our_weight(), self.scales, self.bits, self.group_size)
        elif path == "int8pack" and x.dtype == torch.bfloat16:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self._scales_for(x.dtype))
        elif path == "int4pack" and x.dtype == torch.bfloat16:
            self.to_kernel_layout()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.group_size,
                                                           self._scales_for(x.dtype))
        else:
            y = self._dequantize_matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _blocks(self, dtype: torch.dtype):
        """(row slice, dequantized weight rows) a block at a time (~1 MiB of float32)."""
        q = self.our_weight()
        rows = max(64, _BLOCK_BYTES // (4 * self.in_features))
        for r in range(0, self.out_features, rows):
            yield slice(r, r + rows), dequantize(q[r:r + rows], self.scales[r:r + rows], self.bits, dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # bf16 GEMMs are emulated without AVX512-BF16 (scalar-speed on AVX2): run those in float32
        return plan().compute_dtype(x.dtype) if x.device.type == "cpu" else x.dtype

    def _dequantize_matmul(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        xc = x.to(dtype)
        outs = [F.linear(xc, w) for _, w in self._blocks(dtype)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
                f"path={self.path}")


class _DequantizeMatmul(torch.autograd.Function):
    """y = x Wᵀ over the dequantized weight; backward dx = dy W, dequantizing again block by
    block, so no float copy of W is kept between forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        return module._dequantize_matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        module = ctx.module
        dtype = module._compute_dtype(dy)
        dyc = dy.to(dtype)
        dx = None
        for rows, w in module._blocks(dtype):
            part = dyc[:, rows] @ w
            dx = part if dx is None else dx.add_(part)
        return dx.to(dy.dtype), None


class QuantEmbedding(QuantLinear):
    """A quantized [vocab, hidden] table used two ways: row lookup (`forward`, gather then
    dequantize only the rows asked for) and, when the LM head is tied, `linear` (the matmul)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int | None = None,
                 dtype=torch.bfloat16, device=None):
        super().__init__(embedding_dim, num_embeddings, bits, group_size, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = dtype  # the model's dtype: rows come out in it

    def choose_path(self, dtype: torch.dtype, exact: bool = False) -> str:
        # the int4 kernel would permute the rows the lookup gathers from: int4 tables never take it
        path = super().choose_path(dtype, exact)
        if path == "int4pack":
            self.path = path = "dequantize"
        return path

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.weight[flat], self.scales[flat], self.bits, self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h)


def _our_layout_hook(module: QuantLinear, state: dict, prefix: str, local_metadata) -> None:
    if module.is_kernel_layout:
        state[prefix + "weight"] = module.our_weight()
