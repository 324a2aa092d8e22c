"""int8 activations x int8 / int4 weights: the binding of qdot.c (its header says why and how).

`available()` says whether the compiled library loaded (it is built by `pip install`, optional:
without a C compiler it is absent and the quantized layers keep torch's kernels). `matmul(x, q,
scales, bits, group)` is y = x @ dequantize(q, scales)ᵀ with x quantized per row and per block of
32 columns to int8 on the way in: not equal to the dequantize path (activations lose ~8 bits of
mantissa, as in llama.cpp), but each row's result is independent of the rows beside it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

import torch

BLOCK = 32  # activation (and smallest weight) group: columns per int8 block


@functools.cache
def _lib() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_qdot{suffix}"
        if path.exists():
            break
    else:
        return None
    # torch is imported first (module level above), so the library's libgomp.so.1 resolves to the
    # one torch loaded: one OpenMP thread pool, not two spinning against each other.
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ug_isa.argtypes, lib.ug_isa.restype = [ctypes.c_int], ctypes.c_int
    lib.ug_linear.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.ug_linear.restype = ctypes.c_int
    lib.ug_quantize_weights.argtypes = [ptr, ctypes.c_int, i64, i64, ctypes.c_int, i64, ptr, ptr]
    lib.ug_quantize_weights.restype = None
    kv = [ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, ptr]
    lib.ug_kv_scores.argtypes, lib.ug_kv_scores.restype = kv, ctypes.c_int
    lib.ug_kv_values.argtypes, lib.ug_kv_values.restype = kv, ctypes.c_int
    lib.ug_isa(_TORCH_CAP.get(torch.backends.cpu.get_cpu_capability(), 2))
    return lib


def available() -> bool:
    return _lib() is not None


LEVELS = ("c", "avx2", "avx512-vnni")  # qdot.c's code levels; int8 weights top out at avx2
# torch capped to a lower ISA (ATEN_CPU_CAPABILITY, to test the other machines' paths) caps these too
_TORCH_CAP = {"DEFAULT": 0, "AVX2": 1}


def isa() -> str | None:
    """The code that runs: 'avx512-vnni', 'avx2' or 'c' (the plain loops); None: not built."""
    lib = _lib()
    return None if lib is None else LEVELS[lib.ug_isa(-1)]


def set_level(level: str | None) -> None:
    """Cap the code level ('c', 'avx2', 'avx512-vnni'; None: as high as this CPU and torch's
    capability allow). Tests compare the levels."""
    lib = _lib()
    if lib is not None:
        cap = _TORCH_CAP.get(torch.backends.cpu.get_cpu_capability(), 2)
        lib.ug_isa(cap if level is None else min(cap, LEVELS.index(level)))


def supports(K: int, group: int) -> bool:
    return K % BLOCK == 0 and group % BLOCK == 0


WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def quantize_weights(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack.quantize_int8 / quantize_int4 of w [N, K] (float32, bfloat16 or float16, on the CPU),
    bit for bit, in C: (codes, float16 scales [N, K / group]). Raises as they do."""
    from .pack import _scales_f16

    w = w.contiguous()
    N, K = w.shape
    if K % group or (bits == 4 and group % 2) or w.dtype not in WEIGHT_DTYPES or w.device.type != "cpu":
        raise ValueError(f"quantize_weights: cannot quantize {w.dtype} {tuple(w.shape)} to int{bits}-g{group}")
    q = torch.empty(N, K if bits == 8 else K // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
    d = torch.empty(N, K // group, dtype=torch.float32)
    _lib().ug_quantize_weights(w.data_ptr(), WEIGHT_DTYPES[w.dtype], N, K, bits, group, q.data_ptr(), d.data_ptr())
    return q, _scales_f16(d[..., None])


def matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x [M, K] @ the weight (q, float16 scales [N, K / group])ᵀ → [M, N] in x's dtype: one C call
    for float32 and bfloat16 (quantizing, the dot products, the output cast), else via float32."""
    M, K = x.shape
    N = q.shape[0]
    # the C code trusts these: a wrong dtype or shape would read out of bounds
    want = (torch.int8, K) if bits == 8 else (torch.uint8, K // 2)
    if ((q.dtype, q.shape[1]) != want or not q.is_contiguous() or scales.dtype != torch.float16
            or tuple(scales.shape) != (N, K // group) or not scales.is_contiguous() or not supports(K, group)):
        raise ValueError(f"qdot.matmul: codes {q.dtype} {tuple(q.shape)} / scales {scales.dtype} "
                         f"{tuple(scales.shape)} do not fit int{bits}-g{group} with {K} inputs")
    dtype = x.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    if _lib().ug_linear(x.data_ptr(), bf16, M, K, q.data_ptr(), scales.data_ptr(), group, N, bits, y.data_ptr(), bf16):
        raise MemoryError(f"qdot.matmul: no memory for the {M} x {K} activations' buffers")
    return y.to(dtype)


def reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """What `matmul` computes, in torch ops (float64): the activations rounded as qdot.c rounds
    them, times the dequantized weight. The tests' oracle."""
    from .pack import dequantize

    w = dequantize(q, scales, bits, torch.float64)
    return rounded_activations(x) @ w.t()


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the C code sees it after quantizing it per block of 32 (float64): the
    oracles' half of `matmul`, `kv_scores`."""
    blocks = x.double().unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True).float()
    # 127 / amax in one rounding, as the C code divides (`127.0 / t` in torch is 127 * (1 / t): two)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xr = torch.round(blocks.float() * inv).double() * (amax / 127.0).double()  # round: half to even
    return xr.flatten(-2)


def kv_fits(codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether `kv_scores` / `kv_values` read this int8 cache view (codes [B, H, K, D] int8,
    scales [B, H, K, D / g] float16) as it is: 32 | g | D, rows of a head contiguous."""
    D, n = codes.shape[-1], scales.shape[-1]
    return (available() and codes.dtype == torch.int8 and scales.dtype == torch.float16 and codes.device.type == "cpu"
            and D % n == 0 and supports(D, D // n) and codes.stride()[2:] == (D, 1) and scales.stride()[2:] == (n, 1))


def kv_scores(q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q [B, H, R, D] @ the dequantized keys [B, H, K, D]ᵀ → float32 [B, H, R, K], q quantized
    to int8 per 32 columns on the way in (as `matmul`)."""
    B, H, R, D = q.shape
    K = codes.shape[2]
    _check_kv(q.shape[:2], D, codes, scales)
    q = q.float().contiguous()
    y = torch.empty(B, H, R, K, dtype=torch.float32)
    if _lib().ug_kv_scores(q.data_ptr(), B, H, R, D, codes.data_ptr(), codes.stride(0), codes.stride(1),
                           scales.data_ptr(), scales.stride(0), scales.stride(1), K, D // scales.shape[-1],
                           y.data_ptr()):
        raise MemoryError(f"qdot.kv_scores: no memory for {B * H * R} quantized queries")
    return y


def kv_values(p: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """p [B, H, R, K] (float32) @ the dequantized values [B, H, K, D] → float32 [B, H, R, D], in
    fp32 fused multiply-adds over the slots in order."""
    B, H, R, K = p.shape
    D = codes.shape[-1]
    _check_kv(p.shape[:2], D, codes, scales)
    if codes.shape[2] != K:
        raise ValueError(f"qdot.kv_values: {K} probabilities per row for {codes.shape[2]} cached slots")
    p = p.float().contiguous()
    y = torch.empty(B, H, R, D, dtype=torch.float32)
    if _lib().ug_kv_values(p.data_ptr(), B, H, R, K, codes.data_ptr(), codes.stride(0), codes.stride(1),
                           scales.data_ptr(), scales.stride(0), scales.stride(1), D, D // scales.shape[-1],
                           y.data_ptr()):
        raise MemoryError("qdot.kv_values: no memory for the per-thread buffers")
    return y


def _check_kv(bh, D: int, codes: torch.Tensor, scales: torch.Tensor) -> None:
    # the C code trusts these: a wrong shape or stride would read out of bounds
    if (not kv_fits(codes, scales) or tuple(codes.shape[:2]) != tuple(bh) or codes.shape[-1] != D
            or tuple(scales.shape[:3]) != tuple(codes.shape[:3])):
        raise ValueError(f"qdot: int8 cache view {tuple(codes.shape)} / scales {tuple(scales.shape)} does not fit "
                         f"heads {tuple(bh)} of dim {D}")


# As a torch operator, so a compiled decode step (generate/runner.py) keeps the layer inside its
# graph (an opaque call; the norms, rope and residuals around it fuse) instead of breaking there.
@torch.library.custom_op("unigemma::qdot_linear", mutates_args=())
def linear_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    return matmul(x, q, scales, bits, group)


@linear_op.register_fake
def _(x, q, scales, bits, group):
    return x.new_empty(x.shape[0], q.shape[0])
