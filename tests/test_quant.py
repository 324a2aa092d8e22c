"""Weight-only quantization: error bounds, ggml-exact rounding, kernel == dequantize oracle,
quantized models close to float, quantized checkpoints saved and reloaded as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import unigemma
from reference import S, F, Shape, write_checkpoint
from unigemma.errors import CheckpointError
from unigemma.quant import qdot
from unigemma.quant.apply import QuantScheme, quantize
from unigemma.quant.linear import QuantEmbedding, QuantLinear
from unigemma.quant.cpu_int4 import convert, kernel_layout
from unigemma.quant.kernels import MAX_ROWS, describe, plan
from unigemma.quant.pack import dequantize, pack_nibbles, quantize_int4, quantize_int8, unpack_nibbles
from unigemma.weights.save import save_quantized

gguf_quants = pytest.importorskip("gguf.quants", reason="the gguf package holds ggml's reference quantizers")
from gguf import GGMLQuantizationType as T  # noqa: E402


def weights(N=192, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    w[3] = 0  # an all-zero row: scale 0, no division by zero
    w[5, :7] *= 40  # outliers
    return w


@pytest.mark.parametrize("group", [None, 32])
def test_int8_error_bound(group):
    w = weights()
    q, s = quantize_int8(w, group)
    d = dequantize(q, s, 8)
    per_elem = s.float().repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    # half a step, plus the float16 rounding of the scale times |q| <= 127
    assert ((d - w).abs() <= per_elem * (0.5 + 127 * 2 ** -11) + 1e-12).all()
    assert d[3].abs().max() == 0


@pytest.mark.parametrize("group", [32, 128])
def test_int4_error_bound(group):
    w = weights()
    q, s = quantize_int4(w, group)
    d = dequantize(q, s, 4)
    step = s.float().abs().repeat_interleave(group, dim=1)
    # the positive extreme of a group clips from +8 to +7 steps: at most one step off
    assert ((d - w).abs() <= step * (1 + 8 * 2 ** -11) + 1e-12).all()
    rel = ((d - w).norm() / w.norm()).item()
    assert rel < (0.10 if group == 32 else 0.13), rel  # uniform steps of max|w|/8 on Gaussian weights


@pytest.mark.parametrize("bits,qtype", [(8, T.Q8_0), (4, T.Q4_0)])
def test_group32_quantization_is_ggml_bit_for_bit(bits, qtype):
    """int8-g32 / int4-g32 quantize exactly as llama.cpp's Q8_0 / Q4_0 (gguf-py's reference)."""
    w = weights(64, 512, seed=1)
    q, s = (quantize_int8 if bits == 8 else quantize_int4)(w, 32)
    ref = gguf_quants.dequantize(gguf_quants.quantize(w.numpy(), qtype), qtype)
    assert np.array_equal(dequantize(q, s, bits).numpy(), ref)


@pytest.mark.parametrize("N,K", [(128, 96), (64, 2), (320, 256)])
def test_nibble_layouts_round_trip_and_match_torch_packing(N, K):
    """The kernel's order is learned on this CPU; it must equal torch's own conversion op here."""
    u = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    p = pack_nibbles(u)
    assert torch.equal(unpack_nibbles(p), u)
    layout = kernel_layout()
    assert layout is not None, f"no int4 kernel layout learned on {torch.backends.cpu.get_cpu_capability()}"
    kernel = convert(u)
    assert torch.equal(layout.pack(p), kernel)
    assert torch.equal(layout.unpack(kernel), p)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_int4_kernel_on_other_isas(capability):
    """torch's int4 kernel order differs per ISA (64-row blocks on AVX-512, 32 on AVX2, row pairs
    on the plain build), qdot.c's code level follows torch's capability, and CI lands on either
    kind of CPU: run the layout and kernel tests again with torch and oneDNN capped to each lower
    ISA, so every order and code level is checked on any machine."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip().lower() == capability
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                        "-k", "nibble or kernels_equal or int8_activation or state_dict_is_our or odd_shapes"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:]
    # skips only for a missing qdot.c build (no C compiler at install), which the plan reports
    assert " passed" in r.stdout and ("skipped" not in r.stdout or plan().int8_act is None), r.stdout[-1000:]


def module(w, bits, group):
    m = QuantLinear(w.shape[1], w.shape[0], bits, group)
    m.set_weight(*quantize(w, bits, group))
    return m


def exact_paths(bits, group, N, K, dtype):
    """The float-activation paths that can run the layer here, whether or not the plan prefers
    them on this CPU (torch's kernels run, slowly, without native bf16 too): each is checked."""
    paths = {"dequantize"}
    if dtype == torch.bfloat16 and bits == 8 and group is None:
        paths.add("int8pack")
    if dtype == torch.bfloat16 and bits == 4 and N % 64 == 0 and group in (32, 64, 128, 256) and kernel_layout():
        paths.add("int4pack")
    return sorted(paths)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128), (8, 32), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 7, 300])
def test_exact_kernels_equal_dequantize_oracle(bits, group, dtype, M):
    w = weights(192, 256)
    m = module(w, bits, group)
    x = torch.randn(M, 256).to(dtype)
    oracle = torch.nn.functional.linear(x.float(), m.dequantize()).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the kernels round scales and outputs to bf16
    for path in exact_paths(bits, group, 192, 256, dtype):
        m.path = path
        y = m(x)
        err = ((y.float() - oracle.float()).abs().max() / oracle.float().abs().max()).item()
        print(f"{path} bits={bits} group={group} M={M} {dtype}: max rel err {err:.2e}")
        assert err < tol, path


needs_qdot = pytest.mark.skipif(plan().int8_act is None, reason="qdot.c was not built (no C compiler at install)")


@needs_qdot
@pytest.mark.parametrize("bits,group,K", [(8, None, 256), (8, 32, 256), (4, 32, 256), (4, 128, 256), (4, 32, 96),
                                          (4, 64, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activation_kernel_equals_its_definition(bits, group, K, dtype):
    """int8-act = activations rounded to int8 per 32 columns (qdot.reference, float64) times the
    dequantized weight; within a float32 summation's rounding of it, on each code level (plain C,
    AVX2, AVX-512 VNNI); and near the float product (the activations' rounding, as llama.cpp's)."""
    w = weights(192, K)  # K = 96, 320: an odd number of blocks, and groups across block pairs
    m = module(w, bits, group)
    m.path = "int8-act"
    x = torch.randn(5, K).to(dtype)
    ref = qdot.reference(x, m.weight, m.scales, bits, group or K)
    got = {}
    try:  # every code level this CPU runs (the AVX-512 one is int4's; the others' results equal it to rounding)
        for level in qdot.LEVELS[:qdot.LEVELS.index(plan().int8_act) + 1]:
            qdot.set_level(level)
            got[level] = m(x)
    finally:
        qdot.set_level(None)
    oracle = torch.nn.functional.linear(x.double(), m.dequantize(torch.float64))
    for name, y in got.items():
        assert y.dtype == dtype
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-5 if dtype == torch.float32 else 4e-3), (name, err)  # bf16: the output's rounding
        drift = ((y.double() - oracle).norm() / oracle.norm()).item()
        assert drift < 2e-2, (name, drift)  # ~0.4% a value: 8-bit activations


@needs_qdot
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128)])
def test_int8_activation_rows_do_not_depend_on_their_neighbours(bits, group):
    """Speculative decoding verifies k + 1 tokens in one call and must equal k + 1 one-token
    steps: every row, computed among up to MAX_ROWS others, is bit-equal to that row alone."""
    m = module(weights(192, 256), bits, group)
    m.path = "int8-act"
    x = torch.randn(MAX_ROWS["int8-act"], 256) * torch.logspace(-2, 2, MAX_ROWS["int8-act"])[:, None]
    together = m(x)
    for n in (2, 3, 5, MAX_ROWS["int8-act"]):
        assert torch.equal(m(x[:n]), together[:n])
    for i in range(x.shape[0]):
        assert torch.equal(m(x[i:i + 1])[0], together[i])


@needs_qdot
def test_int8_activation_kernel_refuses_what_it_cannot_read():
    q, s = quantize(weights(64, 64), 4, 32)
    with pytest.raises(ValueError, match="do not fit"):
        qdot.matmul(torch.randn(1, 64), q.to(torch.int8), s, 4, 32)  # int4 codes are uint8
    with pytest.raises(ValueError, match="do not fit"):
        qdot.matmul(torch.randn(1, 64), q, s.float(), 4, 32)


def test_int4_state_dict_is_our_layout_after_kernel_packing():
    w = weights(128, 64)
    m = module(w, 4, 32)
    ours = m.weight.clone()
    m.path = "int4pack"  # the plan picks it only with native bf16; it runs everywhere
    m(torch.randn(1, 64, dtype=torch.bfloat16))  # the bf16 kernel moves the weight into its order
    assert m.is_kernel_layout and not torch.equal(m.weight, ours)
    assert torch.equal(m.state_dict()["weight"], ours)


def test_odd_shapes_fall_back_to_dequantize():
    m = module(weights(96, 64), 4, 32)  # 96 rows: not a multiple of torch's int4 kernel's 64-row blocks
    assert m.choose_path(torch.bfloat16, exact=True) == "dequantize"
    x = torch.randn(2, 64)
    assert torch.allclose(m(x), x @ m.dequantize().T, atol=1e-5)
    m = module(weights(64, 48), 8, 16)  # groups of 16: narrower than the int8-act kernel's blocks
    assert m.choose_path(torch.float32) == "dequantize"


def test_plan_names_the_cpu_and_every_layer_kind(ckpt):
    p = plan()
    assert p.capability == torch.backends.cpu.get_cpu_capability()
    assert p.cpu_model and p.capability in p.line()
    model = unigemma.load_model(ckpt, dtype="float32", quant="int4-g32")
    kinds = describe(model)
    quantized = {k: n for k, n in kinds.items() if k.split()[0] in ("int8-act", "int8pack", "int4pack", "dequantize")}
    assert sum(quantized.values()) == sum(isinstance(m, QuantLinear) for m in model.modules())
    assert all(k.startswith(("onednn-packed", "aten")) for k in kinds.keys() - quantized.keys())
    exact = describe(unigemma.load_model(ckpt, dtype="float32", quant="int4-g32", exact=True))
    assert not any(k.startswith("int8-act") for k in exact)


@pytest.mark.parametrize("group", [None, 32])
def test_quantized_embedding_lookup_and_tied_head(group):
    w = weights(300, 64)
    e = QuantEmbedding(300, 64, 8, group, dtype=torch.float32)
    e.set_weight(*quantize(w, 8, group))
    table = e.dequantize()
    ids = torch.tensor([[0, 5, 299], [3, 3, 1]])
    assert torch.equal(e(ids), table[ids])
    h = torch.randn(2, 64)
    e.choose_path(torch.float32, exact=True)
    assert torch.allclose(e.linear(h), h @ table.T, atol=1e-5)
    if plan().int8_act is not None:  # the fast head: activations rounded to 8 bits, ~0.4% a logit
        e.path = "int8-act"
        assert torch.allclose(e.linear(h), h @ table.T, atol=0.05 * (h @ table.T).abs().max().item())


def test_scheme_names_and_errors():
    assert QuantScheme.parse("int8") == QuantScheme(8, None, None)
    assert QuantScheme.parse("int8-g32") == QuantScheme(8, 32, 32)
    assert QuantScheme.parse("int4-g128") == QuantScheme(4, 128, None)
    for bad in ("int4", "int3-g32", "fp8", "int8-g0"):
        with pytest.raises(ValueError):
            QuantScheme.parse(bad)


# Two layers: deeper random models are chaotic (bf16 rounding alone flips 10% of the top-1 of a
# 4-layer one); test_gemma3.py checks quantization on the real trained 270M as well.
SHAPE = Shape(hidden=256, intermediate=512, head_dim=64, global_head_dim=128, layers=(S, F))


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return write_checkpoint(SHAPE, ckpt_root)


@pytest.mark.parametrize("quant,min_cos,min_top1", [("int8", 0.995, 0.95), ("int8-g32", 0.995, 0.95),
                                                    ("int4-g32", 0.85, 0.9), ("int4-g128", 0.8, 0.9)])
def test_quantized_forward_close_to_float(ckpt, quant, min_cos, min_top1):
    ids = torch.randint(0, SHAPE.vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = unigemma.load_model(ckpt, dtype="float32").logits(ids)
    q = unigemma.load_model(ckpt, dtype="float32", quant=quant)
    assert q.model.embed_vision.patch_dense.__class__ is torch.nn.Linear  # media embedders stay float
    out = q.logits(ids)
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, 1), ref.flatten(0, 1), dim=-1).mean().item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{quant}: mean cosine {cos:.5f}, top-1 agreement {top1:.3f}")
    assert cos > min_cos and top1 >= min_top1


@pytest.mark.parametrize("quant", ["int8", "int4-g32"])
def test_save_and_reload_quantized(ckpt, tmp_path, quant):
    ids = torch.randint(0, SHAPE.vocab, (1, 30))
    live = unigemma.load_model(ckpt, dtype="float32", quant=quant)
    out = save_quantized(ckpt, tmp_path / "q", quant, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == (8 if quant == "int8" else 4)
    again = unigemma.load_model(out, dtype="float32")
    assert again.quant_scheme == QuantScheme.parse(quant)
    assert torch.equal(live.logits(ids), again.logits(ids))
    with pytest.raises(CheckpointError, match="already quantized"):
        unigemma.load_model(out, quant="int8-g32" if quant == "int8" else "int8")


def test_bad_quantization_entry_is_a_clear_error(ckpt, tmp_path):
    out = save_quantized(ckpt, tmp_path / "q", "int8", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not one unigemma wrote"):
        unigemma.load_model(out)


def test_group_that_does_not_divide_a_layer_is_a_clear_error(ckpt):
    with pytest.raises(CheckpointError, match="in-features 256 do not split into groups of 384"):
        unigemma.load_model(ckpt, quant="int4-g384")


def test_cli_quantize_writes_a_checkpoint_that_loads(ckpt, tmp_path, capsys):
    from unigemma.cli import main

    assert main(["quantize", "--model", str(ckpt), "--quant", "int4-g32", "--out", str(tmp_path / "q")]) == 0
    assert unigemma.load_model(tmp_path / "q").quant_scheme == QuantScheme.parse("int4-g32")
    assert main(["quantize", "--model", str(ckpt), "--out", str(tmp_path / "r")]) == 2
    assert "needs --quant" in capsys.readouterr().err


@needs_qdot
@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_weight_quantizer_is_bit_for_bit_the_torch_one(bits, group, dtype):
    """The loader quantizes in C (qdot.c): the same codes and scales as pack.py's torch ops, for
    every input dtype, with all-zero rows, ties for the largest magnitude and exact halves."""
    w = weights(96, 256).to(dtype)
    w[7, :32] = torch.tensor([1.0, -1.0] * 16).to(dtype)  # a tie: the first of largest magnitude
    w[9, :32] = (torch.arange(32) - 16.0).to(dtype) / 8  # values that land on halves
    g = group or 256
    ours = qdot.quantize_weights(w, bits, g)
    torch_ = quantize_int8(w, group) if bits == 8 else quantize_int4(w, g)
    assert torch.equal(ours[0], torch_[0]) and torch.equal(ours[1], torch_[1])
