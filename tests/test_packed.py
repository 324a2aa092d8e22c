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
    assert isinstance(packed.lm_head, PackedHead) and not hasattr(plain, "lm_head")  # tied: swapped in
    assert packed.state_dict().keys() <= plain.state_dict().keys()  # the head adds no names
    assert torch.equal(packed.text.embed_tokens.weight, plain.text.embed_tokens.weight)
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
    assert isinstance(streamed.lm_head, PackedHead)
    assert streamed.state_dict().keys() == after.state_dict().keys()
    assert not any(type(m) is nn.Linear for m in streamed.text.layers.modules())
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    assert torch.equal(streamed.logits(ids), after.logits(ids))


def test_untied_head_is_swapped_for_its_packed_form():
    """An untied head's Linear is replaced by a PackedHead (its plain weight goes); the logits
    stay bit-identical in bf16, and the state dict only loses the packed weights' names."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support in oneDNN")
    from unigemma.config import ModelConfig
    from unigemma.models import family_of
    from unigemma.weights.random import randomize_reference

    family = family_of("gemma3_text")
    config = ModelConfig.from_dict(dict(family.tiny_config("gemma3_text"), tie_word_embeddings=False))
    plain = family.model(config)
    randomize_reference(plain, 0)
    plain = plain.to(torch.bfloat16).eval()
    packed = family.model(config).to(torch.bfloat16).eval()
    packed.load_state_dict(plain.state_dict())
    assert type(packed.lm_head) is nn.Linear
    pack_linears(packed)
    assert isinstance(packed.lm_head, PackedHead) and packed.head_weight() is None
    assert not any(k.startswith("lm_head.") for k in packed.state_dict())
    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])
    assert torch.equal(packed.logits(ids), plain.logits(ids))


def test_swap_head_refuses_a_module_with_state():
    """The swapped-in head must not add names to the state dict (a tied table is saved once)."""
    from unigemma.models.packed import swap_head

    with pytest.raises(ValueError, match="holds tensors"):
        swap_head(nn.Module(), nn.Linear(4, 8))


def test_upcast_linear_runs_bf16_rows_as_float32_gemms_and_keeps_the_weight():
    """models/upcast.py (bf16 where bf16 arithmetic is emulated): up to MAX_ROWS rows are plain
    bf16 F.linear, more rows a float32 GEMM of the same bf16 weight rounded to bf16 once; the
    parameter is the Linear's own (no copy, same state-dict name)."""
    from unigemma.models.upcast import MAX_ROWS, UpcastLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=True).bfloat16()
    up = UpcastLinear(lin)
    assert up.weight is lin.weight and set(up.state_dict()) == {"weight", "bias"}
    few = torch.randn(MAX_ROWS, 96).bfloat16()
    assert torch.equal(up(few), torch.nn.functional.linear(few, lin.weight, lin.bias))
    many = torch.randn(3, 40, 96).bfloat16()
    want = (torch.nn.functional.linear(many.float(), lin.weight.float()) + lin.bias.float()).bfloat16()
    assert torch.equal(up(many), want)


def test_upcast_matmul_backward_is_the_float32_product():
    """Training a bf16 model where bf16 is emulated (finetune/run.py, loss.py): dx = dy W from
    upcast weight blocks (several blocks here), the frozen weight getting no gradient, no copy
    kept; a weight that trains takes plain F.linear."""
    from unigemma.models.upcast import upcast_matmul

    torch.manual_seed(0)
    w = torch.randn(300, 64).bfloat16()
    x = torch.randn(2, 5, 64).bfloat16().requires_grad_()
    y = upcast_matmul(x, w, block_bytes=64 * 4 * 64)  # 64-row blocks: 5 of them
    assert torch.equal(y, torch.nn.functional.linear(x.float(), w.float()).bfloat16())
    dy = torch.randn_like(y)
    y.backward(dy)
    # the blocks' partial products add in another order than one GEMM's: bf16 rounding apart
    assert torch.allclose(x.grad.float(), dy.float() @ w.float(), rtol=8e-3, atol=1e-2)
    trained = w.clone().requires_grad_()
    upcast_matmul(x.detach(), trained).sum().backward()
    assert trained.grad is not None
