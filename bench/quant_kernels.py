"""Quantized matmul kernels vs the plain dequantize path, as weight-read bandwidth (GB/s).

For each weight shape [N out, K in] and batch M (1: decode, 512: prefill) times
y = x @ Wᵀ with bf16 activations through every path of quant/linear.py, plus the bf16 float
matmul for reference. "kernel" rows force the packed kernel at every M (QuantLinear itself
switches to dequantize above KERNEL_MAX_ROWS rows, where these numbers show it is faster). GB/s = bytes of the stored weight (with scales) / time: the number that
bounds decode speed. Best of `--repeat` runs after a warm-up; one thread unless --threads.

    taskset -c 1 python -m bench.quant_kernels [--shapes 1536x4096 8192x1536] [--threads 1]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.machine import machine
from unigemma.quant import linear as ql
from unigemma.quant.pack import quantize_int4, quantize_int8

PATHS = [  # name, bits, group, use kernels
    ("bf16", None, None, False),
    ("int8 kernel", 8, None, True), ("int8 dequant", 8, None, False), ("int8-g32 dequant", 8, 32, False),
    ("int4-g32 kernel", 4, 32, True), ("int4-g128 kernel", 4, 128, True), ("int4-g32 dequant", 4, 32, False),
]


def timeit(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def module(w: torch.Tensor, bits: int, group: int | None) -> ql.QuantLinear:
    N, K = w.shape
    m = ql.QuantLinear(K, N, bits, group)
    m.set_weight(*(quantize_int8(w, group) if bits == 8 else quantize_int4(w, group)))
    return m


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["1536x4096", "8192x1536", "15360x3840"])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 512])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes:
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K) / K ** 0.5
        for name, bits, group, kernels in PATHS:
            if bits is None:
                wb = w.bfloat16()
                fn_for = lambda x: torch.nn.functional.linear(x, wb)  # noqa: E731
                nbytes = wb.numel() * 2
            else:
                m = module(w, bits, group)
                nbytes = m.weight.numel() * m.weight.element_size() + m.scales.numel() * 2
                fn_for = m
            for M in args.batch:
                x = torch.randn(M, K).bfloat16()
                ql.USE_KERNELS = kernels
                limits = dict(ql.KERNEL_MAX_ROWS)
                ql.KERNEL_MAX_ROWS.update({k: 1 << 30 for k in limits})  # time the kernel itself at every M
                s = timeit(lambda: fn_for(x), args.repeat if M == 1 else max(2, args.repeat // 2))
                ql.USE_KERNELS = True
                ql.KERNEL_MAX_ROWS.update(limits)
                rows.append(dict(shape=shape, path=name, M=M, ms=round(s * 1e3, 3), gb_s=round(nbytes / s / 1e9, 2),
                                 gflop_s=round(2 * M * N * K / s / 1e9, 1)))
                r = rows[-1]
                print(f"{shape:>11} {name:>18} M={M:<4} {r['ms']:9.3f} ms {r['gb_s']:7.2f} GB/s {r['gflop_s']:8.1f} GFLOP/s",
                      flush=True)
    print(json.dumps({"bench": "quant_kernels", **machine(args.threads), "dtype": "bfloat16", "rows": rows}))


if __name__ == "__main__":
    main()
