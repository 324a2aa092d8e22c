"""Greedy generation with the KV cache: equal to transformers' greedy `generate`, and to a
full recompute; the cache's ring buffers and rollback keep it exact."""

import pytest
import torch
from reference import Shape, audio_frames, load_reference, patches, write_checkpoint
from test_parity import build_prompt

import unigemma
from unigemma.generate.greedy import greedy_generate

N = 64


def hf_greedy(ref, ids, n=N, **kw):
    ref.generation_config.eos_token_id = None  # random weights: never stop early
    with torch.no_grad():
        out = ref.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           disable_compile=True, **kw)
    return out[:, ids.shape[1]:]


def test_text_greedy_equals_transformers(ckpt_root):
    g = torch.Generator().manual_seed(20)
    shape = Shape(window=5, seed=7)
    ids, _ = build_prompt(shape, [("text", 12)], g)  # 64 new tokens run far past the window
    path = write_checkpoint(shape, ckpt_root)
    want = hf_greedy(load_reference(path), ids)
    got = greedy_generate(unigemma.load_model(path, dtype="float32"), ids, max_new_tokens=N, stop_ids=[])
    print(f"\n[generate] text: {int((want == got).all(-1).sum())}/1 rows equal; {want[0, :16].tolist()}")
    assert torch.equal(got, want)
    assert len(set(got[0].tolist())) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize("block_mask,cache", [("all", "dynamic"), ("sliding", "static")])
def test_image_audio_greedy_equals_transformers(ckpt_root, block_mask, cache):
    """transformers' default dynamic cache builds composition "all"; its static cache "sliding"."""
    g = torch.Generator().manual_seed(21)
    shape = Shape(window=6, seed=8)
    pv, pos = patches([(3, 3)], 12, g)
    feats, fmask = audio_frames([6], g)
    ids, types = build_prompt(shape, [("text", 3), ("image", 9), ("text", 2), ("audio", 6), ("text", 3)], g)
    media = dict(pixel_values=pv, image_position_ids=pos, input_features=feats, input_features_mask=fmask)
    path = write_checkpoint(shape, ckpt_root)
    want = hf_greedy(load_reference(path), ids, mm_token_type_ids=types, cache_implementation=cache, **media)
    model = unigemma.load_model(path, dtype="float32", block_mask=block_mask)
    got = greedy_generate(model, ids, max_new_tokens=N, stop_ids=[], mm_token_type_ids=types, **media)
    assert torch.equal(got, want)


def full_recompute_greedy(model, ids, n, **kw):
    """The slow oracle: re-run the whole sequence for every new token, no cache."""
    seq = ids
    for _ in range(n):
        types = kw.get("mm_token_type_ids")
        if types is not None:
            kw["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, seq.shape[1] - types.shape[1]))
        nxt = model.head(model(seq, torch.arange(seq.shape[1])[None], require_media=False, **kw))[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[:, ids.shape[1]:]


def test_cached_decode_equals_full_recompute_past_the_window(ckpt_root):
    g = torch.Generator().manual_seed(22)
    shape = Shape(window=4, seed=9)
    ids, _ = build_prompt(shape, [("text", 6)], g)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    assert torch.equal(greedy_generate(model, ids, max_new_tokens=24, stop_ids=[]),
                       full_recompute_greedy(model, ids, 24))


def test_left_padded_batch_generates_like_single_rows(ckpt_root):
    g = torch.Generator().manual_seed(23)
    shape = Shape(window=5, seed=7)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    rows = [build_prompt(shape, [("text", n)], g)[0][0] for n in (9, 4, 13)]
    L = max(len(r) for r in rows)
    ids, mask = torch.zeros(3, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    batch = greedy_generate(model, ids, mask, max_new_tokens=20, stop_ids=[])
    for i, r in enumerate(rows):
        assert torch.equal(batch[i], greedy_generate(model, r[None], max_new_tokens=20, stop_ids=[])[0])


def test_stops_at_stop_id_and_pads_finished_rows(ckpt_root):
    g = torch.Generator().manual_seed(24)
    shape = Shape(seed=7)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    ids, _ = build_prompt(shape, [("text", 8)], g)
    free = greedy_generate(model, ids, max_new_tokens=12, stop_ids=[])
    stop = int(free[0, 5])
    first = free[0].tolist().index(stop)
    got = greedy_generate(model, ids, max_new_tokens=12, stop_ids=[stop])
    assert got[0].tolist() == free[0, :first + 1].tolist()


def test_compiled_decode_step_generates_what_eager_does(ckpt_root, tmp_path, monkeypatch):
    """Engine(compile_step=True): Inductor compiles generate/runner.py's decode step (through the
    scheduler's BatchCache) once, with dynamic shapes: one graph serves every step while the
    rows grow and the sliding ring wraps, and the greedy tokens equal eager's."""
    import shutil

    from mock_model import MockTokenizer
    from torch._dynamo.utils import counters

    from unigemma.config import FULL, SLIDING
    from unigemma.generate.engine import Engine
    from unigemma.generate.sampling import SamplingParams

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile's Inductor backend needs a C++ compiler on the CPU, and none is installed")
    # A cache of this test's own: Inductor's on-disk cache is not keyed by ATEN_CPU_CAPABILITY, and
    # kernels cached by a default-ISA run, reused under the AVX2 cap, decoded token 0 over and over
    # (seen 2026-11-30, torch 2.13); a fresh compile under either ISA gives eager's tokens.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    shape = Shape(window=4, seed=9, layers=(SLIDING, FULL))  # two layers: a short compile
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    ids, _ = build_prompt(shape, [("text", 10)], torch.Generator().manual_seed(25))
    p = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # reserve 2: a ring of 5 slots, wrapped several times by the 34 tokens
    want = Engine(model, MockTokenizer(), reserve=2).generate({"input_ids": ids}, p)
    torch._dynamo.reset()
    counters.clear()
    got = Engine(model, MockTokenizer(), reserve=2, compile_step=True).generate({"input_ids": ids}, p)
    assert got.token_ids == want.token_ids and len(set(got.token_ids)) > 3
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, graphs  # compiled (not a silent eager fallback), and not once per step
