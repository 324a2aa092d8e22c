"""Quantized matmul kernels against each other and the float matmul, as weight-read bandwidth (GB/s).

For each weight shape [N out, K in] and batch M (1: decode, 512: prefill) times y = x @ Wᵀ
through every path of quant/linear.py that can run the layer here, forced (`QuantLinear.path`;
a real module switches to "dequantize" above the kernel's MAX_ROWS rows, quant/kernels.py):
  int8-act      qdot.c, int8 activations (per channel int8, int8-g32, int4-g32, int4-g128)
  int8pack / int4pack   torch's weight-only kernels (bf16 activations)
  dequantize    the plain path
plus the float matmuls for reference (bf16 F.linear, float32 F.linear, bf16 oneDNN-packed where
native). GB/s = bytes of the stored weight (codes and scales) / time: the number that bounds
decode. Best of `--repeat` after a warm-up. The default shapes include the 12B's (15360 x 3840)
and Gemma 3 270M's tied head (262144 x 640), large enough to stream from memory.

    python -m bench.quant_kernels [--shapes 1536x4096 8192x1536] [--threads 2] [--batch 1 512]

Prints a table, then one JSON line (machine and kernel plan included).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.machine import machine
import torch.nn.functional as F

from unigemma.quant import linear as ql
from unigemma.quant.cpu_int4 import ROW_MULTIPLE, kernel_layout
from unigemma.quant.kernels import plan
from unigemma.quant.pack import quantize_int4, quantize_int8

PATHS = [  # name, bits, group (None: per channel), path
    ("int8-act int8", 8, None, "int8-act"), ("int8-act int8-g32", 8, 32, "int8-act"),
    ("int8-act int4-g32", 4, 32, "int8-act"), ("int8-act int4-g128", 4, 128, "int8-act"),
    ("int8pack int8", 8, None, "int8pack"), ("int4pack int4-g32", 4, 32, "int4pack"),
    ("dequantize int8", 8, None, "dequantize"), ("dequantize int4-g32", 4, 32, "dequantize"),
]


def timeit(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def module(w: torch.Tensor, bits: int, group: int | None, path: str) -> ql.QuantLinear:
    N, K = w.shape
    m = ql.QuantLinear(K, N, bits, group)
    m.set_weight(*(quantize_int8(w, group) if bits == 8 else quantize_int4(w, group)))
    m.path = path
    return m


def floats(w: torch.Tensor):
    """name → (fn of x [M, K] bf16, weight bytes) for the float references."""
    wb, wf = w.bfloat16(), w.float()
    out = {"bf16 F.linear": (lambda x: F.linear(x, wb), wb.numel() * 2),
           "fp32 F.linear": (lambda x: F.linear(x.float(), wf), wf.numel() * 4)}
    if plan().bf16_native:
        pk = torch.ops.mkldnn._reorder_linear_weight(wb, 1)
        out["bf16 onednn-packed"] = (lambda x: torch.ops.mkldnn._linear_pointwise(x, pk, None, "none", [], ""),
                                     wb.numel() * 2)
    return out


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["2048x640", "8192x2048", "15360x3840", "262144x640"])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 4, 512])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes:
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K) / K ** 0.5
        fns = dict(floats(w))
        for name, bits, group, path in PATHS:
            if path == "int8-act" and plan().int8_act is None:
                continue
            if path == "int4pack" and (N % ROW_MULTIPLE or kernel_layout() is None):
                continue
            m = module(w, bits, group, path)
            fns[name] = (m, m.weight.numel() * m.weight.element_size() + m.scales.numel() * 2)
        del w
        for name, (fn, nbytes) in fns.items():
            for M in args.batch:
                if M > 64 and N * K > 1 << 26:
                    continue  # a prefill GEMM on the 168M-weight head: minutes, not a decode figure
                x = torch.randn(M, K).bfloat16()
                s = timeit(lambda: fn(x), args.repeat if M == 1 else max(2, args.repeat // 2))
                rows.append(dict(shape=shape, path=name, M=M, ms=round(s * 1e3, 3), gb_s=round(nbytes / s / 1e9, 2),
                                 gflop_s=round(2 * M * N * K / s / 1e9, 1)))
                r = rows[-1]
                print(f"{shape:>11} {name:>22} M={M:<4} {r['ms']:9.3f} ms {r['gb_s']:7.2f} GB/s {r['gflop_s']:8.1f} GFLOP/s",
                      flush=True)
    print(json.dumps({"bench": "quant_kernels", **machine(args.threads), "dtype": "bfloat16", "rows": rows}))


if __name__ == "__main__":
    main()
