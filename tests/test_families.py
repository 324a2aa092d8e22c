"""One smoke runner over every registered model family (mlx-lm's model_test_runner): a tiny random
model of each family's own config keeps the protocol's invariants (models/base.py), its
checkpoint names round-trip, and quantization picks only its decoder's Linear layers.
A new family in models/__init__.py FAMILIES runs through all of these with no test edits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unigemma
from unigemma.config import ModelConfig
from unigemma.models import FAMILIES, family_of, family_of_gguf, model_class, renames
from unigemma.models.attention import attend
from unigemma.quant.apply import QuantScheme, is_quantizable, plan_for
from unigemma.weights.random import randomize_reference as randomize
from unigemma.weights.save import save_checkpoint

CASES = [(f, t) for f in FAMILIES for t in f.model_types]
IDS = [t for _, t in CASES]


def tiny_model(family, model_type, dtype=torch.float32, seed=0):
    d = family.tiny_config(model_type)
    config = ModelConfig.from_dict(d)
    model = family.model(config)
    randomize(model, seed)
    return d, model.to(dtype).eval()


def text_ids(model, n, seed=1):
    """Random ids of ordinary tokens (no media placeholders)."""
    c = model.config
    ids = torch.randint(3, c.text.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    media = [t for t in (c.image_token_id, c.video_token_id, c.audio_token_id) if t is not None]
    ids[torch.isin(ids, torch.tensor(media or [-1]))] = 3
    return ids


def prefill(model, ids, chunks, **cache_kw):
    """Hidden states of every position, the prompt fed through a cache in `chunks`."""
    cache, out, at = model.make_cache(1, 64, **cache_kw), [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(model(ids[:, at:at + n], torch.arange(at, at + n)[None], cache=cache))
            at += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_registry_finds_the_family(family, model_type):
    assert family_of(model_type) is family
    config = ModelConfig.from_dict(family.tiny_config(model_type))
    assert config.model_type == model_type and model_class(config) is family.model
    assert renames(config) == (family.to_ours, family.load_transform)
    for arch in family.gguf_archs:
        assert family_of_gguf(arch) is family


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(unigemma.ConfigError, match="unknown model_type 'llama'.*gemma3_text"):
        family_of("llama")


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_cached_forward_equals_uncached_logits(family, model_type):
    _, model = tiny_model(family, model_type)
    ids = text_ids(model, 24)
    h, _ = prefill(model, ids, [24])
    want = model.logits(ids)
    assert want.shape == (1, 24, model.config.text.vocab_size) and want.dtype == torch.float32
    assert (model.head(h) - want).abs().max() < 1e-4


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_chunked_prefill_equals_one_forward(family, model_type):
    _, model = tiny_model(family, model_type)
    ids = text_ids(model, 24, seed=2)
    one, _ = prefill(model, ids, [24])
    chunked, cache = prefill(model, ids, [7, 1, 5, 11], reserve=2)  # window 5: the sliding ring wraps
    assert cache.length == 24
    assert (chunked - one).abs().max() < 1e-4


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_a_token_does_not_depend_on_how_many_share_its_step(family, model_type):
    """attend's invariant, bf16: one-token steps equal the same tokens verified together."""
    from unigemma.models.packed import can_pack, pack_linears

    _, model = tiny_model(family, model_type, dtype=torch.bfloat16)
    if not can_pack(model):
        pytest.skip("needs oneDNN bf16: the packed linears are what make bf16 linears batch-invariant")
    pack_linears(model)
    ids = text_ids(model, 30, seed=3)
    with torch.inference_mode():
        _, cache = prefill(model, ids[:, :20], [20])
        singles = torch.cat([model(ids[:, j:j + 1], torch.tensor([[j]]), cache=cache) for j in range(20, 26)], 1)
        cache.trim(6)
        together = model(ids[:, 20:26], torch.arange(20, 26)[None], cache=cache)
    assert torch.equal(singles, together)


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_checkpoint_names_round_trip(family, model_type):
    _, model = tiny_model(family, model_type)
    c = model.config
    for name, tensor in model.state_dict().items():
        disk = family.to_disk(name, c)
        assert family.to_ours(disk, c) == name, (name, disk)
        if tensor.is_floating_point():
            back = family.load_transform(name, family.save_transform(name, tensor))
            assert torch.equal(back.to(tensor.dtype), tensor), name


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_saved_checkpoint_loads_back_to_the_same_logits(tmp_path, family, model_type):
    d, model = tiny_model(family, model_type)
    save_checkpoint(model, d, tmp_path)
    ids = text_ids(model, 12, seed=4)
    assert torch.equal(unigemma.load_model(tmp_path, dtype="float32").logits(ids), model.logits(ids))


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_quantization_picks_only_decoder_linears(family, model_type):
    _, model = tiny_model(family, model_type)
    names = {id(m): n for n, m in model.named_modules()}
    decoder = {names[id(m)] for m in model.text.layers.modules() if type(m) is nn.Linear}
    want = decoder | ({"lm_head"} if hasattr(model, "lm_head") else set())
    picked = {n for n, m in model.named_modules() if is_quantizable(n, m, model)}
    assert decoder and picked == want
    assert {n for n, m in model.named_modules() if is_quantizable(n, m)} == want  # any family's view agrees
    plan = plan_for(model, QuantScheme.parse("int4-g32"))
    assert {n for n, (bits, _) in plan.items() if bits == 4} == want


def test_attend_scale_and_gqa_are_parameters():
    """Gemma 4 (scale 1.0, decode kernel) and Gemma 3 (query_pre_attn_scalar^-0.5, SDPA) both
    compute softmax(q kᵀ · scale + mask) v over grouped KV heads."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    mask = torch.rand(1, 1, 3, 9, generator=g) > 0.3
    mask[..., 0] = True
    for scale in (1.0, 24 ** -0.5):
        rep = lambda t: t.repeat_interleave(2, 1)  # noqa: E731
        want = ((q @ rep(k).transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)) @ rep(v)
        for decode_kernel in (True, False):
            torch.testing.assert_close(attend(q, k, v, mask, scale, use_decode_kernel=decode_kernel), want)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.gguf_archs], ids=lambda f: f.name)
def test_gguf_names_land_on_the_models_parameters(family):
    """Every llama.cpp block / top-level tensor name the family maps is a parameter of its model;
    names it does not know come back unchanged (the placer reports them as unexpected)."""
    from unigemma.models.gguf_meta import BLOCK

    model_type = family.model_types[0]
    model = model_class(ModelConfig.from_dict(family.tiny_config(model_type)))(
        ModelConfig.from_dict(family.tiny_config(model_type)))
    ours = set(model.state_dict())
    names = ["token_embd.weight", "output_norm.weight"] + [f"blk.0.{k}.weight" for k in BLOCK]
    mapped = {n: family.gguf_name(n) for n in names}
    hit = {n: m for n, m in mapped.items() if m in ours}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"} <= set(hit)
    for n, m in mapped.items():  # what the tiny model lacks (e.g. attn_v on a K=V layer) is still a layer name
        assert m in ours or m.startswith(("model.", "lm_head")), (n, m)
    assert family.gguf_name("blk.3.unknown.weight") == "blk.3.unknown.weight"
