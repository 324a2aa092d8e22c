"""KV cache invariants: ring buffers wrap, chunked prefill and rollback stay exact."""

import pytest
import torch
from reference import Shape, patches, write_checkpoint
from test_parity import build_prompt

import unigemma
from unigemma.cache.kv import KVCache
from unigemma.config import FULL, SLIDING


def run_chunks(model, ids, chunks, reserve, **kw):
    """Feed ids through the cache in the given chunk sizes; return logits of every position."""
    cache = model.make_cache(ids.shape[0], ids.shape[1], reserve=reserve)
    out, at = [], 0
    for n in chunks:
        part = ids[:, at:at + n]
        types = kw.get("mm_token_type_ids")
        extra = {} if types is None else {"mm_token_type_ids": types[:, at:at + n]}
        media = kw.get("media", {}) if at == 0 else {}
        with torch.inference_mode():
            h = model(part, torch.arange(at, at + n)[None], cache=cache, require_media=False, **extra, **media)
        out.append(model.head(h))
        at += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("chunks,reserve", [([40], 1), ([3] * 13 + [1], 3), ([1] * 40, 1), ([17, 1, 9, 13], 2)])
def test_chunked_prefill_through_ring_equals_one_shot(ckpt_root, chunks, reserve):
    g = torch.Generator().manual_seed(30)
    shape = Shape(window=6, seed=11)
    ids, _ = build_prompt(shape, [("text", 39)], g)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    got, cache = run_chunks(model, ids, chunks, reserve)
    assert cache.layers[0][0].shape[2] == 6 - 1 + reserve  # sliding memory capped at the window
    assert cache.layers[-1][0].shape[2] == 40  # full layers sized to the request
    assert (got - model.logits(ids)).abs().max() < 1e-4


def test_image_block_inside_one_chunk_matches_one_shot(ckpt_root):
    g = torch.Generator().manual_seed(31)
    shape = Shape(window=5, seed=12)
    pv, pos = patches([(2, 4)], 8, g)
    ids, types = build_prompt(shape, [("text", 7), ("image", 8), ("text", 9)], g)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    media = dict(pixel_values=pv, image_position_ids=pos)
    want = model.logits(ids, mm_token_type_ids=types, **media)
    # the chunk [0, 18) holds the whole image block (indices 9..16)
    got, _ = run_chunks(model, ids, [18, 4, ids.shape[1] - 22], reserve=2, mm_token_type_ids=types, media=media)
    assert (got - want).abs().max() < 1e-4


def test_trim_rolls_back_exactly(ckpt_root):
    g = torch.Generator().manual_seed(32)
    shape = Shape(window=4, seed=13)
    ids, _ = build_prompt(shape, [("text", 29)], g)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    cache = model.make_cache(1, 30, reserve=4)
    with torch.inference_mode():
        model(ids[:, :20], torch.arange(20)[None], cache=cache)
        junk = torch.randint(3, 900, (1, 4), generator=g)  # four rejected "drafts"
        model(junk, torch.arange(20, 24)[None], cache=cache)
        assert cache.can_trim(4) and not cache.can_trim(5)
        cache.trim(4)
        h = model(ids[:, 20:], torch.arange(20, 30)[None], cache=cache)
    assert (model.head(h) - model.logits(ids)[:, 20:]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.trim(5)


def test_ring_slots_hold_the_latest_window():
    cfg = unigemma.ModelConfig.from_dict({"model_type": "gemma4_unified_text", "vocab_size": 16, "hidden_size": 8,
                                          "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "num_key_value_heads": 1, "head_dim": 4, "global_head_dim": 4,
                                          "sliding_window": 3, "layer_types": [SLIDING, FULL]}).text
    cache = KVCache(cfg, batch=1, max_len=50, dtype=torch.float32, reserve=2)
    assert cache.capacity == {SLIDING: 4, FULL: 50}
    for n in (3, 1, 5, 1):
        cache.begin(torch.ones(1, n, dtype=torch.bool))
        for layer in range(2):
            k = torch.full((1, 1, n, 4), float(cache.length))
            cache.update(layer, k, k)
        cache.end()
    assert cache.length == 10
    assert sorted(cache.slot_idx[SLIDING].tolist()) == [6, 7, 8, 9]
    assert cache.slot_idx[FULL][:10].tolist() == list(range(10))
    with pytest.raises(ValueError, match="holds 50 tokens"):
        cache.begin(torch.ones(1, 41, dtype=torch.bool))


def test_failed_forward_marks_the_cache_unusable(ckpt_root, monkeypatch):
    """A forward that dies mid-way (e.g. out of memory) leaves ring slots half overwritten:
    the cache must refuse further use rather than attend over mixed K/V."""
    shape = Shape(window=4, seed=13)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    cache = model.make_cache(1, 20)
    ids = torch.randint(3, 900, (1, 6))
    model(ids, torch.arange(6)[None], cache=cache)

    def boom(*a, **k):
        raise MemoryError("simulated")

    monkeypatch.setattr(model.text.layers[2], "forward", boom)
    with pytest.raises(MemoryError):
        model(ids[:, :1], torch.tensor([[6]]), cache=cache)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="start a new one"):
        model(ids[:, :1], torch.tensor([[6]]), cache=cache)
