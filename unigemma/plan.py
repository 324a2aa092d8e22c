"""Memory planner: will this model fit, and how long a context then?

    unigemma plan --model path/to/gemma-4-12B [--memory 8GB,16GB,24GB]   (a config.json is enough)

For each way to hold the weights (bf16 on the CPU fast path, int8, int4 in groups of 32 and
128) it prints the weight bytes, and for each way to hold the KV cache (bf16, int8 on the full
layers, int8 on all) its bytes per 1,000 tokens of context, then one table: the longest
context that fits, per weight format x KV choice x memory. The weights are counted on a meta-device build of the
model with the loader's own quantization plan, so the figures follow the code:

    weights   every parameter and buffer as loaded (int8 / int4 codes, float16 scales, the 8-bit
              token table, float media embedders and norms), plus what runs next to them where
              this CPU runs torch's weight-only kernels (quant/kernels.py; not the default
              int8-activation ones): the int4 kernel's bf16 scale/zero table (4 bytes per group)
              and int8's bf16 row scales, and on the bf16 fast path the packed copy of the tied LM head
              (models/packed.py: the lookup table stays, the head is packed apart)
    KV        K and V of every layer (the cache stores V even on K=V full layers: there V is the
              raw projection's norm, K its normed and rotated form, so they differ): full
              layers grow with the context, sliding layers are ring buffers of window - 1 +
              reserve tokens whatever the length. Per KV choice: bf16; int8 on the full layers
              only; int8 on all layers. An int8 vector (one token, one KV head) is its D codes
              and an fp16 scale per 32 channels, D + D/16 bytes (cache/quant.py's layout)
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
from .config import ModelConfig, TextConfig
from .errors import InputError

SCHEMES = ("bf16", "int8", "int4-g32", "int4-g128")
# KV choices: (label, kv dtype, the layer types it applies to; the others stay bf16)
KV_CHOICES = (("bf16", "bf16", "all"), ("int8 full", "int8", "full"), ("int8 all", "int8", "all"))
MEMORIES = ("8GB", "16GB", "24GB")
RUNTIME_BYTES = 512 * 2**20
GiB = 2**30


@dataclass
class Plan:
    scheme: str
    weight_bytes: int
    kv_bytes_per_1k: int  # marginal: each further 1,000 tokens (full layers)
    kv_fixed_bytes: int  # the sliding layers' rings
    max_context: int  # 0: the weights alone do not fit
    kv: str = "bf16"  # the KV choice's label (KV_CHOICES)
    memory: int = 0


def kv_bytes(config: TextConfig, max_len: int, kv_dtype: str = "bf16", quant_layers: str = "all",
             reserve: int = 16) -> int:
    """KV bytes of one sequence of `max_len` tokens: K and V of every layer, `kv_dtype` ("bf16"
    or "int8": D codes + fp16 scales per token, KV head and 32 channels, cache/quant.py) on
    `quant_layers` ("full", "sliding" or "all"), bf16 on the rest. cache/batch.py's count, the
    one the caches are allocated by."""
    if kv_dtype not in ("bf16", "int8"):
        raise InputError(f"kv_dtype must be bf16 or int8, got {kv_dtype!r}")
    if quant_layers not in ("full", "sliding", "all"):
        raise InputError(f"quant_layers must be one of full, sliding, all, got {quant_layers!r}")
    return bytes_per_row(config, max_len, torch.bfloat16, reserve, kv_dtype=kv_dtype, quant_layers=quant_layers)


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


def plan(config: ModelConfig, memory: int, schemes=SCHEMES, reserve: int = 16, kv_dtype: str = "bf16",
         quant_layers: str = "all", weights: dict[str, int] | None = None, label: str | None = None) -> list[Plan]:
    """Per weight scheme: the longest context that fits in `memory` with this KV choice.
    weights: scheme → weight bytes already counted (`weight_bytes`)."""
    t = config.text

    def kv(n: int) -> int:
        return kv_bytes(t, n, kv_dtype, quant_layers, reserve)

    n = t.sliding_window + reserve + 1000  # past the rings' size: only the full layers still grow
    per_token = kv(n + 1) - kv(n)
    per_1k, kv_fixed = 1000 * per_token, kv(n) - n * per_token
    plans = []
    for s in schemes:
        w = weights[s] if weights and s in weights else weight_bytes(config, s)
        free = memory - w - RUNTIME_BYTES
        longest = 0
        if free >= kv(1):
            lo, hi = 1, t.max_position_embeddings
            while lo < hi:  # the largest n with kv(n) <= free
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if kv(mid) <= free else (lo, mid - 1)
            longest = lo
        plans.append(Plan(s, w, per_1k, kv_fixed, longest, label or kv_dtype, memory))
    return plans


def table(config: ModelConfig, memories=MEMORIES, schemes=SCHEMES, kvs=KV_CHOICES, reserve: int = 16) -> list[Plan]:
    """Every weight scheme x KV choice x memory (memories: '16GB'-style strings or bytes)."""
    weights = {s: weight_bytes(config, s) for s in schemes}
    out = []
    for m in memories:
        memory = m if isinstance(m, int) else parse_memory(m)
        for label, kv_dtype, layers in kvs:
            out += plan(config, memory, schemes, reserve, kv_dtype, layers, weights, label)
    return out


def render(config: ModelConfig, plans: list[Plan]) -> str:
    """The weights and KV figures, then the longest contexts: a row per weight scheme, a column
    per memory x KV choice."""
    t = config.text
    schemes = list(dict.fromkeys(p.scheme for p in plans))
    kvs = list(dict.fromkeys(p.kv for p in plans))
    memories = list(dict.fromkeys(p.memory for p in plans))
    first = {}
    for p in plans:
        first.setdefault(p.kv, p)
        first.setdefault(p.scheme, p)
    lines = [f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, context up to "
             f"{t.max_position_embeddings:,} tokens; {RUNTIME_BYTES / GiB:.1f} GiB of each memory kept for the "
             f"runtime and activations",
             "weights: " + ", ".join(f"{s} {first[s].weight_bytes / GiB:.2f} GiB" for s in schemes),
             "KV cache (int8: D codes + an fp16 scale per 32 channels; full layers grow, sliding rings do not):"]
    lines += [f"  {k:<10}{first[k].kv_bytes_per_1k / 2**20:>6.1f} MiB per 1k tokens + "
              f"{first[k].kv_fixed_bytes / 2**20:.0f} MiB of rings" for k in kvs]
    lines.append(f"longest context (tokens; {t.max_position_embeddings:,} is the model's own limit):")
    width = 10
    head = f"{'':<10}" + "".join(f"{f'{m / GiB:g} GiB':^{width * len(kvs)}}" for m in memories)
    sub = f"{'weights':<10}" + "".join(f"{k:>{width}}" for _ in memories for k in kvs)
    lines += [head, sub]
    by = {(p.scheme, p.kv, p.memory): p for p in plans}
    for s in schemes:
        cells = []
        for m in memories:
            for k in kvs:
                n = by[(s, k, m)].max_context
                cells.append(f"{n:,}" if n else "-")
        lines.append(f"{s:<10}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("(- : the weights alone do not fit)")
    return "\n".join(line.rstrip() for line in lines)
