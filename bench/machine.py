"""What machine a benchmark ran on: every benchmark's JSON line carries `machine(threads)`.

CPU model (from /proc/cpuinfo), the ISA torch dispatches to (`ATEN_CPU_CAPABILITY` caps it, and
qdot.c's code level with it), oneDNN's cap (`ONEDNN_MAX_CPU_ISA`), the kernel plan
of quant/kernels.py (bf16 native or not, the int8-activation code, the float kernels), the threads
used, and the read bandwidth measured here with those threads: figures from AVX-512 and AVX2
machines differ several-fold, so none is quoted without these. Each model benchmark adds the
kernel every layer ran (`describe(model)`).
"""

from __future__ import annotations

import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth(threads: int, gib: int = 2) -> float:
    """GB/s of one reduction over `gib` GiB of resident int16, best of 5, with `threads` threads."""
    torch.set_num_threads(threads)
    x = torch.ones(gib << 29, dtype=torch.int16)  # touched: resident
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.max()
        best = max(best, x.numel() * 2 / (time.perf_counter() - t) / 1e9)
    return best


def machine(threads: int, bandwidth_gib: int = 1) -> dict:
    from unigemma.quant.kernels import plan

    p = plan()
    return dict(cpu_model=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
                threads=threads,
                bf16_native=p.bf16_native, int8_act_kernel=p.int8_act,
                float_kernels={"float32": p.float_linear(torch.float32), "bfloat16": p.float_linear(torch.bfloat16)},
                read_bandwidth_gb_s=round(read_bandwidth(threads, bandwidth_gib), 2))
