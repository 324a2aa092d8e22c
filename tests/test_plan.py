"""The memory planner's arithmetic against hand-computed cases, and the 12B config."""

import pytest
import torch

from unigemma.config import ModelConfig
from unigemma.errors import InputError
from unigemma.plan import RUNTIME_BYTES, parse_memory, plan, weight_bytes
from unigemma.quant.kernels import plan as kernel_plan

# Text only, tied head: vocab 1024, hidden 64, MLP 128; layer 0 sliding (4 q heads, 2 KV heads
# of 16), layer 1 full (1 KV head of 32, K=V: no v_proj). Window 8.
TINY = dict(model_type="gemma4_unified_text", vocab_size=1024, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096)

# Linear shapes [N, K]:
SLIDING_LINEARS = [(64, 64), (32, 64), (32, 64), (64, 64)]  # q, k, v, o
FULL_LINEARS = [(128, 64), (32, 64), (64, 128)]  # q, k, o (K=V)
MLP = [(128, 64), (128, 64), (64, 128)]  # gate, up, down
LINEARS = SLIDING_LINEARS + FULL_LINEARS + 2 * MLP
# Float vectors: 4 norms of 64 per layer, q/k norms (16 + 16, 32 + 32), final norm 64, 2 layer scalars
VECTORS = 2 * 4 * 64 + 32 + 64 + 64 + 2
EMBED = 1024 * 64


def test_weight_bytes_by_hand():
    c = ModelConfig.from_dict(TINY)
    nk = sum(n * k for n, k in LINEARS)
    # bf16: everything 2 bytes, plus the packed copy of the tied head
    assert weight_bytes(c, "bf16") == 2 * (nk + VECTORS + EMBED) + 2 * EMBED
    # int8 per channel: 1 byte a weight, a float16 scale per row (+ its bf16 copy where this CPU
    # runs torch's int8 kernel, quant/kernels.py); the table is int8 per channel too
    cpu = kernel_plan()
    shapes = LINEARS + [(1024, 64)]  # the decoder's matrices and the tied table
    rows = sum(n for n, _ in shapes)
    int8_tables = sum(2 * n for n, k in shapes if cpu.quantized(8, k, k, n, torch.bfloat16) == "int8pack")
    assert weight_bytes(c, "int8") == nk + EMBED + 2 * rows + 2 * VECTORS + int8_tables
    # int4-g32: half a byte a weight, float16 scale per 32, and torch's int4 kernel's bf16 scale +
    # zero (4 bytes a group) where this CPU runs it (and the output size is a multiple of 64);
    # the table stays int8 per channel
    groups = sum(n * k // 32 for n, k in LINEARS)
    kernel = sum(n * k // 32 * 4 for n, k in LINEARS if cpu.quantized(4, 32, k, n, torch.bfloat16) == "int4pack")
    table = 2 * 1024 if cpu.quantized(8, 64, 64, 1024, torch.bfloat16) == "int8pack" else 0
    assert weight_bytes(c, "int4-g32") == nk // 2 + 2 * groups + kernel + EMBED + 2 * 1024 + 2 * VECTORS + table


def test_context_by_hand():
    c = ModelConfig.from_dict(TINY)
    # per token: full layer K and V, 1 head of 32, bf16 = 128 bytes; the sliding ring holds
    # 8 - 1 + 16 = 23 tokens of 2 heads of 16 (K and V, bf16) = 23 * 128 bytes
    w = weight_bytes(c, "bf16")
    tokens = 1000
    memory = w + RUNTIME_BYTES + 23 * 128 + tokens * 128
    (p,) = plan(c, memory, ["bf16"])
    assert p.kv_bytes_per_1k == 1000 * 128 and p.kv_fixed_bytes == 23 * 128
    assert p.max_context == tokens
    (p,) = plan(c, memory + 127, ["bf16"])
    assert p.max_context == tokens  # one byte short of another token
    (p,) = plan(c, w + RUNTIME_BYTES - 1, ["bf16"])
    assert p.max_context == 0
    (p,) = plan(c, 10**12, ["bf16"])
    assert p.max_context == 4096  # capped by the model's context


def test_12b_figures():
    from pathlib import Path

    path = Path(__file__).parents[2] / "shared/configs/gemma-4-12B/config.json"
    if not path.is_file():
        pytest.skip(f"{path} (the shared 12B config) is not in this checkout's parent")
    c = ModelConfig.from_file(path)
    plans = {p.scheme: p for p in plan(c, parse_memory("16GB"))}
    # 11,959,730,176 parameters, 48 layer scalars (buffers); the 262,144 x 3840 table once more
    # packed for the head
    assert plans["bf16"].weight_bytes == 2 * 11_959_730_176 + 2 * 48 + 2 * 262144 * 3840
    assert plans["bf16"].max_context == 0 and plans["int8"].max_context > 100_000
    assert plans["int8"].kv_bytes_per_1k == 1000 * 8 * 2 * 512 * 2  # 8 full layers, 1 KV head of 512
    assert plans["int4-g128"].weight_bytes < plans["int4-g32"].weight_bytes < plans["int8"].weight_bytes


def test_parse_memory():
    assert parse_memory("16GB") == parse_memory("16 GiB") == parse_memory("16g") == 16 * 2**30
    assert parse_memory("1500MB") == 1500 * 2**20
    with pytest.raises(InputError, match="16GB"):
        parse_memory("lots")


def test_plan_command(capsys):
    from unigemma.cli import main

    from pathlib import Path

    path = str(Path(__file__).parents[2] / "shared/configs/gemma-4-12B")
    if not Path(path).is_dir():
        pytest.skip("the shared 12B config is not next to this checkout")
    assert main(["plan", "--model", path, "--memory", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "int4-g128" in out and "int8 full" in out and "weights alone do not fit" in out
    assert main(["plan", "--model", path]) == 0  # 8, 16 and 24 GB
    out = capsys.readouterr().out
    assert all(f"{m} GiB" in out for m in (8, 16, 24))
    assert main(["plan", "--model", path, "--memory", "plenty"]) == 2


def test_int8_kv_by_hand():
    from unigemma.plan import kv_bytes

    t = ModelConfig.from_dict(TINY).text
    # full layer: 1 head of 32 → bf16 K+V 128 bytes a token; int8 K+V 2 x (32 codes + one fp16 scale
    # per 32 channels) = 68; sliding ring of 23 slots, 2 heads of 16 → bf16 23 x 128; int8 23 x 2 x 2 x (16 + 2) = 23 x 72
    n = 1000
    assert kv_bytes(t, n) == n * 128 + 23 * 128
    assert kv_bytes(t, n, "int8", "full") == n * 68 + 23 * 128
    assert kv_bytes(t, n, "int8", "all") == n * 68 + 23 * 72
    assert kv_bytes(t, n, "int8", "sliding") == n * 128 + 23 * 72
    c = ModelConfig.from_dict(TINY)
    w = weight_bytes(c, "bf16")
    (p,) = plan(c, w + RUNTIME_BYTES + 23 * 128 + 1000 * 68 + 67, ["bf16"], kv_dtype="int8", quant_layers="full")
    assert (p.max_context, p.kv_bytes_per_1k, p.kv_fixed_bytes) == (1000, 68_000, 23 * 128)
    with pytest.raises(InputError):
        kv_bytes(t, n, "int4")


def test_kv_bytes_is_what_the_cache_allocates():
    """The planner's count against the cache's own buffers (and cache/batch.py's count)."""
    import inspect

    from unigemma.cache.batch import bytes_per_row
    from unigemma.cache.kv import KVCache
    from unigemma.plan import kv_bytes

    t = ModelConfig.from_dict(TINY).text
    for n in (5, 30, 700):
        cache = KVCache(t, 1, n, torch.bfloat16, reserve=16)
        assert kv_bytes(t, n) == sum(b.numel() * b.element_size() for layer in cache.layers for b in layer)
        assert kv_bytes(t, n) == bytes_per_row(t, n, torch.bfloat16, 16)
    if "kv_dtype" not in inspect.signature(KVCache).parameters:
        pytest.skip("this cache has no int8 storage yet (cache/kv.py kv_dtype): bf16 checked only")
    for layers in ("full", "all", "sliding"):
        cache = KVCache(t, 1, 700, torch.bfloat16, reserve=16, kv_dtype="int8", quant_layers=layers)
        held = sum(b.numel() * b.element_size() for layer in cache.layers for b in layer)
        assert kv_bytes(t, 700, "int8", layers) == held
        assert kv_bytes(t, 700, "int8", layers) == bytes_per_row(t, 700, torch.bfloat16, 16, kv_dtype="int8",
                                                                  quant_layers=layers)


def test_12b_table():
    from pathlib import Path

    from unigemma.plan import render, table

    path = Path(__file__).parents[2] / "shared/configs/gemma-4-12B/config.json"
    if not path.is_file():
        pytest.skip(f"{path} (the shared 12B config) is not in this checkout's parent")
    c = ModelConfig.from_file(path)
    plans = table(c, ["8GB", "16GB"], ["int4-g128"])
    by = {(p.kv, p.memory >> 30): p for p in plans}
    # int8 full layers: 8 layers x 1 KV head x (512 codes + 16 fp16 scales of 32 channels) x K and V
    assert by[("int8 full", 8)].kv_bytes_per_1k == 1000 * 8 * 2 * (512 + 32)
    assert by[("int8 full", 8)].kv_fixed_bytes == by[("bf16", 8)].kv_fixed_bytes  # rings stay bf16
    # int8 rings: 40 layers x 8 heads x (1023 + 16) slots x 2 x (256 + 8 fp16 scales)
    assert by[("int8 all", 8)].kv_fixed_bytes == 40 * 8 * 1039 * 2 * 272
    # in 8 GB an int8 cache about doubles the context; 16 GB holds the model's whole context
    assert 1.8 < by[("int8 full", 8)].max_context / by[("bf16", 8)].max_context < 2.0
    assert by[("int8 all", 8)].max_context > by[("int8 full", 8)].max_context
    assert by[("bf16", 16)].max_context == 262_144
    text = render(c, plans)
    assert "int4-g128" in text and f"{by[('int8 all', 8)].max_context:,}" in text
