"""The CPU fast path (oneDNN-prepacked weights) computes what the plain modules compute:
bit-identical in bf16, equal to rounding in fp32, the same greedy tokens either way."""

import pytest
import torch
from reference import Shape, write_checkpoint
from torch import nn

import unigemma
from unigemma.generate.greedy import greedy_generate
from unigemma.models.packed import PackedHead, PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_equals_linear(dtype, rows):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support in oneDNN")
    torch.manual_seed(0)
    lin = nn.Linear(96, 160, bias=True).to(dtype)
    x = torch.randn(2, rows, 96, dtype=dtype)
    with torch.inference_mode():
        want, got = lin(x), PackedLinear(lin.weight, lin.bias)(x)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_model_generates_what_the_plain_model_generates(ckpt_root, dtype):
    path = write_checkpoint(Shape(window=5, seed=7), ckpt_root)
    plain = unigemma.load_model(path, dtype=dtype)
    packed = pack_linears(unigemma.load_model(path, dtype=dtype))
    if not can_pack(plain):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    assert packed.packed_head is not None
    assert not any(type(m) is nn.Linear for m in packed.text.layers.modules())
    c = plain.config
    media = {c.image_token_id, c.video_token_id, c.audio_token_id}
    ids = torch.randint(0, c.text.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    ids[torch.isin(ids, torch.tensor(sorted(media)))] = 1  # text only
    a = plain.logits(ids)
    b = packed.logits(ids)
    if dtype == "bfloat16":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() < 1e-4
    assert torch.equal(greedy_generate(plain, ids, max_new_tokens=20, stop_ids=[]),
                       greedy_generate(packed, ids, max_new_tokens=20, stop_ids=[]))


def test_packed_head_in_blocks_equals_one_matmul():
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support in oneDNN")
    torch.manual_seed(0)
    w = torch.randn(PackedHead.ROWS * 2 + 100, 64, dtype=torch.bfloat16)  # a ragged last block
    h = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = PackedHead.from_weight(w)(h)
    assert got.shape == (3, w.shape[0]) and torch.equal(got, torch.nn.functional.linear(h, w))


def test_loader_packs_as_it_reads(ckpt_root):
    """load_model(pack=True) packs each decoder weight from the file (and the head block by
    block): the same logits as packing a loaded model, bit for bit in bf16."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support in oneDNN")
    path = write_checkpoint(Shape(window=5, seed=7), ckpt_root)
    streamed = unigemma.load_model(path, dtype="bfloat16", pack=True)
    after = pack_linears(unigemma.load_model(path, dtype="bfloat16"))
    assert isinstance(streamed.packed_head, PackedHead)
    assert not any(type(m) is nn.Linear for m in streamed.text.layers.modules())
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    assert torch.equal(streamed.logits(ids), after.logits(ids))
