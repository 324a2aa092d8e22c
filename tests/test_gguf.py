"""GGUF import: dequantizers bit-exact to gguf-py, lossless Q8_0 / Q4_0 repacks, the reader,
llama.cpp-converted Gemma 4 files (text + mmproj) giving our safetensors logits, and clear
errors for corrupt, truncated or unsupported files."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import unigemma
from unigemma.quant.kernels import plan
from gguf_convert import converter_available, rewrite_gguf, to_gguf
from reference import S, F, SMALL_IDS, Shape, audio_frames, patches, write_checkpoint
from unigemma.errors import CheckpointError
from unigemma.gguf.dequant import dequantize, repack
from unigemma.gguf.arch import our_name
from unigemma.gguf.reader import GGUFFile, read_gguf_metadata
from unigemma.quant.pack import dequantize as dequantize_ours

gguf = pytest.importorskip("gguf", reason="the gguf package holds ggml's reference dequantizers")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402
from gguf import quants  # noqa: E402

# where each block stores its float16 scale(s): random bytes there could be inf/NaN
SCALE_BYTES = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(name: str, rows: int, cols: int, rng) -> np.ndarray:
    qt = T[name]
    if name == "F32":
        return rng.standard_normal(rows * cols).astype(np.float32).view(np.uint8)
    if name == "F16":
        return rng.standard_normal(rows * cols).astype(np.float16).view(np.uint8)
    if name == "BF16":
        return (rng.standard_normal(rows * cols).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=rows * cols // block * size, dtype=np.uint8)
    b = raw.reshape(-1, size)
    for at in SCALE_BYTES[name]:
        b[:, at:at + 2] = (rng.standard_normal(len(b)) * 0.1).astype(np.float16)[:, None].view(np.uint8)
    return raw


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_is_bit_exact_to_gguf(name):
    rng = np.random.default_rng(0)
    rows, cols = 6, 1024
    raw = random_blocks(name, rows, cols, rng)
    ref = quants.dequantize(raw.reshape(rows, -1), T[name]).astype(np.float32)
    got = dequantize(torch.from_numpy(raw.copy()), int(T[name]), (rows, cols)).numpy()
    assert got.shape == ref.shape and np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name,bits", [("Q8_0", 8), ("Q4_0", 4)])
def test_repack_is_lossless(name, bits):
    rng = np.random.default_rng(1)
    raw = random_blocks(name, 64, 256, rng)
    b, q, s = repack(torch.from_numpy(raw.copy()), int(T[name]), (64, 256))
    assert b == bits and s.dtype == torch.float16 and s.shape == (64, 8)
    ref = quants.dequantize(raw.reshape(64, -1), T[name])
    assert np.array_equal(dequantize_ours(q, s, bits).numpy(), ref)


# --- files converted by llama.cpp's converter -------------------------------------------------
TEXT = Shape(hidden=64, intermediate=128, head_dim=32, global_head_dim=64, layers=(S, S, S, F), vision=True, audio=True)
NO_KV_SHARE = Shape(hidden=64, intermediate=128, head_dim=32, global_head_dim=64, layers=(S, F, S, F), k_eq_v=False,
                    global_kv_heads=2, vision=False, audio=False, seed=1)
needs_converter = pytest.mark.usefixtures("converter")


@pytest.fixture(scope="session")
def converter():
    """llama.cpp's converter, fetched once with pip on first use (not at collection)."""
    why = converter_available()
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="module")
def ckpt(ckpt_root):
    return write_checkpoint(TEXT, ckpt_root)


def ids_for(shape, n=24, seed=0):
    return torch.randint(0, 1000, (2, n), generator=torch.Generator().manual_seed(seed))


@needs_converter
@pytest.mark.parametrize("shape", [TEXT, NO_KV_SHARE], ids=["k_eq_v", "separate_v"])
def test_f32_gguf_logits_equal_safetensors(ckpt_root, shape):
    ckpt = write_checkpoint(shape, ckpt_root)
    ids = ids_for(shape)
    ref = unigemma.load_model(ckpt, dtype="float32").logits(ids)
    got = unigemma.load_model(to_gguf(ckpt, "f32"), dtype="float32").logits(ids)
    print(f"f32 GGUF vs safetensors: max abs diff {(got - ref).abs().max().item():.3g}")
    assert torch.equal(got, ref)


@needs_converter
def test_q8_0_gguf_equals_our_int8_g32(ckpt):
    ids = ids_for(TEXT)
    q8 = unigemma.load_model(to_gguf(ckpt, "q8_0"), dtype="float32")
    ours = unigemma.load_model(ckpt, dtype="float32", quant="int8-g32")
    a, b = q8.state_dict(), ours.state_dict()  # the GGUF holds the text model: no media embedders
    assert a.keys() == {k for k in b if "language_model" in k} and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(q8.logits(ids), ours.logits(ids))


@needs_converter
def test_quant_float_dequantizes_a_q8_0_gguf(ckpt, tmp_path):
    """quant="float": every Q8_0 tensor becomes a plain float matrix, exactly gguf's dequantization
    (the same function as the int8-g32 modules compute); a quantized safetensors checkpoint refuses."""
    from unigemma.errors import CheckpointError
    from unigemma.quant.linear import QuantLinear

    ids = ids_for(TEXT)
    q8 = unigemma.load_model(to_gguf(ckpt, "q8_0"), dtype="float32")
    flt = unigemma.load_model(to_gguf(ckpt, "q8_0"), dtype="float32", quant="float")
    assert not any(isinstance(m, QuantLinear) for m in flt.modules())
    layer_q, layer_f = q8.model.language_model.layers[0], flt.model.language_model.layers[0]
    assert torch.equal(layer_f.mlp.up_proj.weight, layer_q.mlp.up_proj.dequantize())
    torch.testing.assert_close(flt.logits(ids), q8.logits(ids), rtol=1e-4, atol=1e-4)  # same weights, other kernels
    from unigemma.weights.save import save_quantized

    saved = save_quantized(ckpt, tmp_path / "q", "int8", dtype="float32")
    with pytest.raises(CheckpointError, match="float"):
        unigemma.load_model(saved, quant="float")


@needs_converter
def test_dequantize_is_what_quant_float_meant(ckpt):
    """dequantize=True names what quant="float" did (the old spelling still works, with a
    DeprecationWarning); it excludes a quantization scheme."""
    path, ids = to_gguf(ckpt, "q8_0"), ids_for(TEXT)
    flt = unigemma.load_model(path, dtype="float32", dequantize=True)
    with pytest.warns(DeprecationWarning, match="dequantize"):
        old = unigemma.load_model(path, dtype="float32", quant="float")
    a, b = flt.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(flt.logits(ids), old.logits(ids))
    with pytest.raises(ValueError, match="exclude each other"):
        unigemma.load_model(path, quant="int8", dequantize=True)


@needs_converter
def test_gguf_packs_as_it_reads(ckpt):
    """pack=True on a GGUF goes through the same placer as safetensors: decoder Linears packed
    as they are read, the tied head packed block by block from the file; the same logits as
    packing a loaded model, bit for bit in bf16."""
    from unigemma.models.packed import PackedHead, pack_linears

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support in oneDNN")
    path = to_gguf(ckpt, "f32")
    streamed = unigemma.load_model(path, dtype="bfloat16", pack=True)
    after = pack_linears(unigemma.load_model(path, dtype="bfloat16"))
    assert isinstance(streamed.lm_head, PackedHead)
    assert not any(type(m) is torch.nn.Linear for m in streamed.text.layers.modules())
    ids = ids_for(TEXT)
    assert torch.equal(streamed.logits(ids), after.logits(ids))


@needs_converter
def test_q4_0_and_q5_0_gguf(ckpt, tmp_path):
    """Q4_0 weights load as our int4-g32 (exactly gguf's dequantization). Q5_0, a block type no
    kernel of ours reads: by default as int8-g32 where the int8-activation kernels run (each value
    within half an 8-bit step of gguf's); with exact=True as gguf's float values, and the model
    computes the function of gguf's dequantized weights."""
    src = to_gguf(ckpt, "f32")

    def qtype(name, shape):  # Q4_0 token table and MLP (as in Google's QAT Q4_0 files), Q5_0 attention
        if len(shape) != 2:
            return None
        return T.Q4_0 if "ffn" in name or "token_embd" in name else T.Q5_0

    path = rewrite_gguf(src, tmp_path / "mixed.gguf", qtype)
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    ref = torch.from_numpy(quants.dequantize(t["blk.0.attn_q.weight"].data, T.Q5_0))
    q_proj = unigemma.load_model(path, dtype="float32").model.language_model.layers[0].self_attn.q_proj
    if plan().int8_act in ("avx2", "avx512-vnni"):
        assert (q_proj.bits, q_proj.group_size) == (8, 32)
        step = q_proj.scales.float().repeat_interleave(32, dim=1)
        assert ((q_proj.dequantize() - ref).abs() <= step * (0.5 + 127 * 2 ** -11) + 1e-12).all()
    else:
        assert isinstance(q_proj, torch.nn.Linear) and q_proj.weight.equal(ref)
    model = unigemma.load_model(path, dtype="float32", exact=True)
    layer = model.model.language_model.layers[0]
    assert layer.mlp.up_proj.bits == 4 and isinstance(layer.self_attn.q_proj, torch.nn.Linear)
    for name, mod in (("blk.0.ffn_up.weight", layer.mlp.up_proj), ("blk.0.ffn_down.weight", layer.mlp.down_proj)):
        assert np.array_equal(mod.dequantize().numpy(), quants.dequantize(t[name].data, t[name].tensor_type))
    assert layer.self_attn.q_proj.weight.equal(ref)
    emb = model.model.language_model.embed_tokens
    table = quants.dequantize(t["token_embd.weight"].data, T.Q4_0)
    assert emb.bits == 4 and np.array_equal(emb(torch.tensor([0, 7, 999])).numpy(), table[[0, 7, 999]])
    # the whole model computes the function of gguf's dequantized weights
    oracle = unigemma.load_model(src, dtype="float32")
    state = oracle.state_dict()  # views of the parameters and buffers
    with torch.no_grad():
        for name, x in t.items():
            if our_name(name, "gemma4") in state:
                state[our_name(name, "gemma4")].copy_(torch.from_numpy(quants.dequantize(x.data, x.tensor_type)))
    ids = ids_for(TEXT)
    assert torch.allclose(model.logits(ids), oracle.logits(ids), atol=1e-5, rtol=1e-5)
    # quant= requantizes everything else too
    q = unigemma.load_model(path, dtype="float32", quant="int4-g32")
    assert q.model.language_model.layers[0].self_attn.q_proj.bits == 4


@needs_converter
def test_mmproj_gguf_image_and_audio_logits_equal_safetensors(ckpt):
    g = torch.Generator().manual_seed(0)
    pv, pos = patches([(2, 3)], 8, g)
    feats, fmask = audio_frames([5], g)
    i = SMALL_IDS
    ids = torch.tensor([[2, 5, 6, i["boi_token_id"]] + [i["image_token_id"]] * 6 + [i["eoi_token_id"], 7,
                        i["boa_token_id"]] + [i["audio_token_id"]] * 5 + [i["eoa_token_index"], 9, 10]])
    types = torch.zeros_like(ids)
    types[ids == i["image_token_id"]], types[ids == i["audio_token_id"]] = 1, 3
    kw = dict(mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos, input_features=feats,
              input_features_mask=fmask)
    ref = unigemma.load_model(ckpt, dtype="float32").logits(ids, **kw)
    model = unigemma.load_model(to_gguf(ckpt, "f32"), dtype="float32", mmproj=to_gguf(ckpt, "f32", mmproj=True))
    assert model.config.image_token_id == i["image_token_id"] and model.config.vision.mm_posemb_size == TEXT.posemb
    assert torch.equal(model.logits(ids, **kw), ref)


@needs_converter
def test_reader_matches_gguf_py(ckpt):
    path = to_gguf(ckpt, "q8_0")
    r = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.arch == "gemma4"
        assert f.metadata["gemma4.block_count"] == r.fields["gemma4.block_count"].contents()
        assert list(f.tensors) == [t.name for t in r.tensors]
        for t in r.tensors:
            info = f.tensors[t.name]
            assert info.shape == tuple(reversed([int(x) for x in t.shape])) and info.type == int(t.tensor_type)
            assert np.array_equal(f.raw(t.name).numpy(), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert read_gguf_metadata(path)["general.architecture"] == "gemma4"


# --- errors ---------------------------------------------------------------------------------
@needs_converter
def test_corrupt_and_truncated_files(ckpt, tmp_path):
    src = to_gguf(ckpt, "f32")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + src.read_bytes()[4:1000])
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        unigemma.load_model(bad)
    data = src.read_bytes()
    for cut, what in ((200, "truncated or malformed GGUF header"), (len(data) - 1000, "truncated")):
        cut_path = tmp_path / f"cut{cut}.gguf"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=what):
            unigemma.load_model(cut_path)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        unigemma.load_model(tmp_path / "missing.gguf")


@needs_converter
def test_unsupported_files(ckpt, tmp_path):
    src = to_gguf(ckpt, "f32")
    llama = rewrite_gguf(src, tmp_path / "llama.gguf", meta={"general.architecture": ("llama", VT.STRING)})
    with pytest.raises(CheckpointError, match="architecture 'llama' is not supported"):
        unigemma.load_model(llama)
    q41 = rewrite_gguf(src, tmp_path / "q41.gguf", lambda n, s: T.Q4_1 if n == "blk.1.ffn_up.weight" else None)
    with pytest.raises(CheckpointError, match="'blk.1.ffn_up.weight' has ggml type Q4_1"):
        unigemma.load_model(q41)
    gone = rewrite_gguf(src, tmp_path / "gone.gguf", drop=("blk.2.ffn_gate.weight",))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: \['model.language_model.layers.2.mlp.gate_proj"):
        unigemma.load_model(gone)
    extra = rewrite_gguf(src, tmp_path / "extra.gguf", extra={"blk.0.ffn_gate_exps.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        unigemma.load_model(extra)
    odd = rewrite_gguf(src, tmp_path / "odd.gguf", extra={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.attn_sinks.weight'"):
        unigemma.load_model(odd)
    with pytest.raises(CheckpointError, match="not an mmproj file"):
        unigemma.load_model(src, mmproj=src)


def test_mmproj_needs_a_gguf_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="mmproj"):
        unigemma.load_model(tmp_path, mmproj=tmp_path / "x.gguf")


@needs_converter
def test_pipeline_load_takes_tokenizer_from_the_gguf(ckpt):
    gemma = unigemma.load(to_gguf(ckpt, "q8_0"), dtype="float32")
    assert gemma.tokenizer is not None and gemma.tokenizer.vocab_size == TEXT.vocab
    assert gemma.tokenizer.token_to_id("<|image|>") == SMALL_IDS["image_token_id"]
    out = gemma.engine.generate({"input_ids": torch.tensor([[2, 5, 6, 7]])},
                                unigemma.generate.sampling.SamplingParams(temperature=0.0, max_tokens=4,
                                                                          ignore_eos=True))
    assert len(out.token_ids) == 4


@needs_converter
def test_cli_generate_from_a_gguf(ckpt, capsys):
    from unigemma.cli import main

    assert main(["generate", "--model", str(to_gguf(ckpt, "q8_0")), "--ids", "2 5 6", "--max-tokens", "3",
                 "--quant", "int8"]) == 0
    assert "greedy ids:" in capsys.readouterr().out
