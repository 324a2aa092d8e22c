"""Which kernel each kind of layer runs on this CPU, decided once per process from what torch,
oneDNN and our compiled library report, printed at start-up (`plan().line()`, `describe(model)`)
and carried in every benchmark's JSON line: a slow path is never silent.

Quantized layers (`QuantLinear.path`), fastest first where each applies:
  "int8-act"    qdot.c: activations quantized to int8 per row and per 32 columns, integer dot
                products with the int8 / int4 codes (llama.cpp's method). Reads 4 or 8 bits a
                weight at the memory rate on AVX2 and AVX-512 alike, where torch's weight-only
                kernels read slower than float32 on AVX2. Changes the numerics like llama.cpp does
                (bench/quant_quality.py: KL and top-1 against bf16 on real weights); each row's
                result is independent of the rows beside it, so a speculative verify equals plain
                decoding. Off with `exact=True`, used for one to `MAX_ROWS` rows.
  "int8pack"    torch's `_weight_int8pack_mm`, per-channel int8, bf16 activations: exact (weights
  "int4pack"    dequantized, activations kept) and fast only with native bf16 (AVX512-BF16 / AMX);
                `_weight_int4pack_mm_for_cpu` likewise for int4.
  "dequantize"  the plain path and the oracle: a block of rows dequantized, then a float matmul,
                in float32 where bf16 arithmetic is emulated (AVX2). Also every prefill above the
                kernels' row limits (a GEMM is compute-bound: the float kernels win there).
Float layers: "onednn-packed" (bf16 weights reordered once for oneDNN where bf16 is native,
models/packed.py), "upcast" (bf16 where it is emulated: one row in bf16, more rows as float32
GEMMs, models/upcast.py) or "aten" (plain F.linear: float32, whose packed form is no faster).

bench/quant_kernels.py measures every candidate on the machine it runs on; the choices below are
what it showed on AVX2 (capped AVX-512 machine) and AVX-512 (Sapphire Rapids), see the README.
"""

from __future__ import annotations

import functools
import os
import platform
from collections import Counter
from dataclasses import dataclass

import torch

from . import qdot

MAX_ROWS = {"int8-act": 16, "int8pack": 48, "int4pack": 192}  # above: "dequantize" (a GEMM)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class CpuPlan:
    cpu_model: str
    capability: str  # torch's ATen dispatch level (ATEN_CPU_CAPABILITY caps it)
    onednn_isa: str  # ONEDNN_MAX_CPU_ISA, or "native"
    bf16_native: bool  # oneDNN runs bf16 matmuls natively (AVX512-BF16, AMX, AVX-NE-CONVERT)
    int8_act: str | None  # qdot.c's code: "avx512-vnni", "avx2", "c" (plain loops), None (not built)

    def quantized(self, bits: int, group: int, in_features: int, out_features: int, dtype: torch.dtype,
                  exact: bool = False) -> str:
        """The kernel for a quantized matrix [out, in] with `dtype` activations."""
        from .cpu_int4 import ROW_MULTIPLE, kernel_layout
        from .linear import INT4_KERNEL_GROUPS

        if not exact and self.int8_act in ("avx2", "avx512-vnni") and qdot.supports(in_features, group):
            return "int8-act"
        if dtype == torch.bfloat16 and self.bf16_native:
            if bits == 8 and group == in_features:
                return "int8pack"
            if (bits == 4 and out_features % ROW_MULTIPLE == 0 and group in INT4_KERNEL_GROUPS
                    and kernel_layout() is not None):
                return "int4pack"
        return "dequantize"

    def float_linear(self, dtype: torch.dtype) -> str:
        """bf16: oneDNN-packed where native, else "upcast" (models/upcast.py). float32: plain
        F.linear, which reads at least as fast as the packed weights at one row on both ISAs
        (and 2-3x faster on small matrices capped to AVX2) and much faster at two rows."""
        if dtype == torch.bfloat16:
            return "onednn-packed" if self.bf16_native and torch.backends.mkldnn.is_available() else "upcast"
        return "aten"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a dequantized GEMM runs in: bf16 only where it is native."""
        return dtype if dtype != torch.bfloat16 or self.bf16_native else torch.float32

    def summary(self) -> dict:
        return dict(cpu_model=self.cpu_model, cpu_capability=self.capability, onednn_max_cpu_isa=self.onednn_isa,
                    bf16_native=self.bf16_native, int8_act_kernel=self.int8_act)

    def line(self) -> str:
        bf16 = "native" if self.bf16_native else "emulated"
        act = {"avx512-vnni": "AVX-512 VNNI (int4) / AVX2 (int8) dot products", "avx2": "AVX2 int8 dot products",
               "c": "plain C loops (no AVX2: slow)",
               None: "not built (no C compiler at install)"}[self.int8_act]
        return f"cpu: {self.cpu_model}; torch ISA {self.capability}, oneDNN {self.onednn_isa}; bf16 {bf16}; int8-act: {act}"


@functools.cache
def plan() -> CpuPlan:
    """This process's plan (the ISA cannot change under it)."""
    # oneDNN's own answer: it honours ONEDNN_MAX_CPU_ISA (False on AVX2, or capped to it)
    bf16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CpuPlan(cpu_model(), torch.backends.cpu.get_cpu_capability(),
                   os.environ.get("ONEDNN_MAX_CPU_ISA", "native"), bf16, qdot.isa())


def describe(model: torch.nn.Module) -> dict[str, int]:
    """'<kernel> <what>' → how many of the model's matmul layers run it (QuantLinear paths with
    their bits and group; packed and plain float Linears with their dtype)."""
    from ..models.packed import PackedHead, PackedLinear
    from ..models.upcast import UpcastLinear
    from .linear import QuantLinear

    seen: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            seen[f"{m.path} int{m.bits}-g{m.group_size}"] += 1
        elif isinstance(m, (PackedLinear, PackedHead)):
            seen[f"onednn-packed {_dtype(m)}"] += 1
        elif isinstance(m, UpcastLinear):
            seen["upcast bfloat16"] += 1
        elif type(m) is torch.nn.Linear:
            seen[f"aten {str(m.weight.dtype).removeprefix('torch.')}"] += 1
    return dict(sorted(seen.items()))


def _dtype(m) -> str:
    t = m.packed if hasattr(m, "packed") else m.parts[0]
    return str(t.dtype).removeprefix("torch.")
