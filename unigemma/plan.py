"""Memory planner: will this model fit, and how long a context then?

    unigemma plan --model path/to/gemma-4-12B --memory 16GB      (a config.json is enough)

For each way to hold the weights (bf16 on the CPU fast path, int8, int4 in groups of 32 and
128) it prints the weight bytes, the KV cache bytes per 1,000 tokens of context and the longest
context that fits in the memory given. The weights are counted on a meta-device build of the
model with the loader's own quantization plan, so the figures follow the code:

    weights   every parameter and buffer as loaded (int8 / int4 codes, float16 scales, the 8-bit
              token table, float media embedders and norms), plus what runs next to them where
              this CPU runs torch's weight-only kernels (quant/kernels.py; not the default
              int8-activation ones): the int4 kernel's bf16 scale/zero table (4 bytes per group)
              and int8's bf16 row scales, and on the bf16 fast path the packed copy of the tied LM head
              (models/packed.py: the lookup table stays, the head is packed apart)
    KV        K and V of every layer in bf16: full layers grow with the context, sliding layers
              are ring buffers of window - 1 + reserve tokens whatever the length
    overhead  RUNTIME_BYTES for the interpreter, torch and activations of a 512-token prefill
              chunk (measured: torch + the engine idle at ~0.25 GB; a chunk's activations of the
              12B stay under 0.2 GB)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache.batch import bytes_per_row
from .cache.kv import ring_capacity
from .config import ModelConfig
from .errors import InputError

SCHEMES = ("bf16", "int8", "int4-g32", "int4-g128")
RUNTIME_BYTES = 512 * 2**20
GiB = 2**30


@dataclass
class Plan:
    scheme: str
    weight_bytes: int
    kv_bytes_per_1k: int  # marginal: each further 1,000 tokens (full layers)
    kv_fixed_bytes: int  # the sliding layers' rings
    max_context: int  # 0: the weights alone do not fit


def parse_memory(text: str) -> int:
    """'16GB', '16 GiB', '12000MB', '8g' → bytes (GB and GiB both read as 2^30, as RAM is sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise InputError(f"memory must look like 16GB, 12000MB or 8g, got {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)])


def load_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    return ModelConfig.from_file(p / "config.json" if p.is_dir() else p)


def weight_bytes(config: ModelConfig, scheme: str) -> int:
    from .quant.apply import QuantScheme
    from .quant.kernels import plan as kernel_plan
    from .quant.linear import QuantLinear
    from .weights.loader import build_model

    quant = None if scheme == "bf16" else QuantScheme.parse(scheme)
    model = build_model(config, scheme=quant, dtype=torch.bfloat16)  # meta device: no memory
    # float tensors load as bf16 (float16 for quantization scales: also 2 bytes); codes as stored
    total = sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                for t in list(model.parameters()) + list(model.buffers()) if t is not None)
    if quant is None:
        if config.text.tie_word_embeddings:
            total += config.text.vocab_size * config.text.hidden_size * 2  # the packed head
        return total
    cpu = kernel_plan()
    for m in model.modules():  # the tables torch's weight-only kernels keep, where this CPU runs them
        if isinstance(m, QuantLinear):
            path = cpu.quantized(m.bits, m.group_size, m.in_features, m.out_features, torch.bfloat16)
            if path == "int8pack":
                total += m.out_features * 2
            elif path == "int4pack" and type(m) is QuantLinear:
                total += (m.in_features // m.group_size) * m.out_features * 4
    return total


def plan(config: ModelConfig, memory: int, schemes=SCHEMES, reserve: int = 16) -> list[Plan]:
    t = config.text
    ring = ring_capacity(t.max_position_embeddings, t.sliding_window, reserve)["sliding_attention"]
    kv_fixed = sum(2 * t.layer_kv_heads[i] * ring * t.layer_head_dims[i] * 2
                   for i, lt in enumerate(t.layer_types) if lt == "sliding_attention")
    plans = []
    for s in schemes:
        w = weight_bytes(config, s)
        free = memory - w - RUNTIME_BYTES

        def kv(n: int) -> int:
            return bytes_per_row(t, n, torch.bfloat16, reserve)

        per_1k = kv(t.sliding_window + 2000) - kv(t.sliding_window + 1000)
        longest = 0
        if free >= kv(1):
            lo, hi = 1, t.max_position_embeddings
            while lo < hi:  # the largest n with kv(n) <= free
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if kv(mid) <= free else (lo, mid - 1)
            longest = lo
        plans.append(Plan(s, w, per_1k, kv_fixed, longest))
    return plans


def render(config: ModelConfig, memory: int, plans: list[Plan]) -> str:
    t = config.text
    lines = [f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, context up to "
             f"{t.max_position_embeddings:,} tokens; memory {memory / GiB:.1f} GiB "
             f"(of which {RUNTIME_BYTES / GiB:.1f} GiB for the runtime and activations)",
             f"{'weights':<10}{'weight GiB':>11}{'KV MiB/1k tok':>15}{'+ rings MiB':>12}{'longest context':>17}"]
    for p in plans:
        ctx = f"{p.max_context:,}" if p.max_context else "does not fit"
        lines.append(f"{p.scheme:<10}{p.weight_bytes / GiB:>11.2f}{p.kv_bytes_per_1k / 2**20:>15.1f}"
                     f"{p.kv_fixed_bytes / 2**20:>12.0f}{ctx:>17}")
    return "\n".join(lines)
