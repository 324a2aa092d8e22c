"""Automatic prefix caching (cache/prefix.py): a restored prefix gives the logits a fresh prefill
gives (fp32), with images across chunk bounds and prompts many sliding windows long; eviction
keeps the store in its byte budget, least recently used first; failures leave it as it was; two
clients of the real server share a system prompt."""

import httpx
import openai
import pytest
import torch
from messages import img, user
from server_helpers import Running, tiny_gemma

from unigemma.cache.prefix import PrefixCache, common_prefix, media_safe
from unigemma.generate.engine import Engine
from unigemma.generate.sampling import SamplingParams
from unigemma.generate.scheduler import Scheduler
from unigemma.inputs import ModelInputs
from unigemma.server import ServerConfig, create_app

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# A window of 16 in the test model: this system prompt alone is several windows long.
SYSTEM = {"role": "system", "content": "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer with facts about item {i}, never guess, cite the tool output." for i in range(12))}
TOL = 2e-4  # fp32: a restored prefix runs the same math, chunked at other bounds


def logits_of(engine, inputs, prefix=None):
    cache, h, cached = engine.prefill(inputs, [GREEDY], prefix=prefix)
    return engine.model.head(h).float(), cached


def assert_close(got, want):
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"max abs logit difference {diff:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.fixture(scope="module")
def window(gemma):
    return gemma.model.config.text.sliding_window


@pytest.mark.parametrize("chunk", [16, 40, 512])
def test_text_hit_equals_a_fresh_prefill(gemma, window, chunk):
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=chunk)
    store = PrefixCache(gemma.model.config.text, 64 << 20)
    prompts = [gemma.inputs([SYSTEM, user(q)]) for q in ("What is item 3?", "And item 7, please?", "Item 9?")]
    keys = [p.token_keys(engine.media_ids) for p in prompts]
    S = prompts[1]["input_ids"].shape[1]
    shared = common_prefix(keys[0], keys[1])
    assert shared > 8 * window  # the restored prefix is several windows long
    _, cached = logits_of(engine, prompts[0], store)
    assert cached == 0 and len(store.entries) == 1
    got, cached = logits_of(engine, prompts[1], store)
    assert_close(got, logits_of(engine, prompts[1])[0])
    # restored at a chunk bound of the first prompt (none within the system prompt at 512), or
    # within the ring's reserve before its end
    assert cached <= shared and (chunk > shared or cached > shared - chunk)
    # ... and cut a chunk where the two part: a third prompt restores the whole shared prefix
    got, cached = logits_of(engine, prompts[2], store)
    assert cached == common_prefix(keys[1], keys[2]) == shared
    assert_close(got, logits_of(engine, prompts[2])[0])
    # the same prompt again: everything but its last token is restored
    got, cached = logits_of(engine, prompts[1], store)
    assert cached == S - 1
    assert_close(got, logits_of(engine, prompts[1])[0])
    assert store.lookups == 4 and store.hits >= 2 + (chunk < shared)


@pytest.mark.parametrize("layers", ["full", "all"])
def test_int8_kv_hit_equals_a_fresh_prefill(gemma, layers):
    """The store copies every tensor of a layer (int8 codes and their scales too): a restored
    int8 prefix is the same codes a fresh prefill writes."""
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=16, kv_cache_dtype="int8", kv_quant_layers=layers)
    store = PrefixCache(gemma.model.config.text, 64 << 20)
    first, second = (gemma.inputs([SYSTEM, user(q)]) for q in ("What is item 3?", "And item 7, please?"))
    logits_of(engine, first, store)
    got, cached = logits_of(engine, second, store)
    assert cached > 0
    assert_close(got, logits_of(engine, second)[0])


def test_kv_format_change_empties_the_engines_store(gemma):
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=16, prefix_cache_mb=64)
    prompt = gemma.inputs([SYSTEM, user("What is item 3?")])
    logits_of(engine, prompt, engine.prefix_cache)
    assert engine.prefix_cache.entries
    engine.set_kv_cache("int8")
    assert not engine.prefix_cache.entries
    got, cached = logits_of(engine, prompt, engine.prefix_cache)
    assert cached == 0


def test_images_across_chunk_bounds(gemma):
    """Image blocks longer than the 16-token chunks: restore points fall only between blocks."""
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=16)
    store = PrefixCache(gemma.model.config.text, 64 << 20)
    first = gemma.inputs([user(img(0), "and", img(1), "what differs?")], image_budget=70)
    second = gemma.inputs([user(img(0), "and", img(1), "which is brighter?")], image_budget=70)
    other = gemma.inputs([user(img(0), "and", img(2), "what differs?")], image_budget=70)  # same ids, other pixels
    logits_of(engine, first, store)
    vision = (second["mm_token_type_ids"][0] > 0).tolist()
    starts = [i for i in range(1, len(vision)) if vision[i] and not vision[i - 1]]
    ends = [i for i in range(1, len(vision)) if vision[i - 1] and not vision[i]]
    assert len(starts) == 2 and ends[0] - starts[0] > 16  # two blocks, each longer than a chunk
    for inputs, lo, hi in ((second, ends[1], len(vision)), (other, starts[1], starts[1])):
        got, cached = logits_of(engine, inputs, store)
        assert_close(got, logits_of(engine, inputs)[0])
        assert lo <= cached <= hi and media_safe(vision, cached)  # `other`: nothing of the second image


def test_restore_points_never_cut_a_vision_block(gemma):
    store = PrefixCache(gemma.model.config.text, 1 << 20)
    from unigemma.cache.prefix import Entry, Piece
    entry = Entry(list(range(100)), {}, [Piece(0, 100, {})])  # every window held
    vision = [False] * 10 + [True] * 30 + [False] * 60
    assert store.point(entry, 25, vision) == 10  # inside the block: back to its start
    assert store.point(entry, 40, vision) == 40 and store.point(entry, 60, vision) == 60
    w = store.window
    gapped = Entry(list(range(100)), {}, [Piece(0, 30, {}), Piece(60, 90, {})])
    assert store.point(gapped, 95, None) == (90 if 90 - (w - 1) >= 60 else 30)


def test_scheduler_requests_decode_as_without_the_cache(gemma):
    """Across requests in the batcher, a reply's tokens are reused by the next turn (an agent
    loop), and every reply equals the one without prefix caching."""
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=32)
    with_cache = Scheduler(engine, max_seqs=2, max_len=1024, prefix_cache_mb=64)
    without = Scheduler(engine, max_seqs=2, max_len=1024, prefix_cache_mb=0)
    messages = [SYSTEM, user("Look up item 4.")]
    cached = []
    for turn in range(3):
        inputs = gemma.inputs(messages)
        got = with_cache.submit(inputs, GREEDY)
        with_cache.run_until_done()
        want = without.submit(inputs, GREEDY)
        without.run_until_done()
        got, want = got.result(), want.result()
        assert got.token_ids == want.token_ids
        cached.append(got.timings.cached_tokens)
        messages = messages + [{"role": "assistant", "content": got.content}, user(f"Now item {turn + 5}.")]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])
    stats = with_cache.stats()
    assert stats["prefix_cache_hits"] == 2 and stats["prefix_cache_bytes"] <= stats["prefix_cache_budget"]
    assert "prefix_cache_hits" not in without.stats()


def held_bytes(store):
    """Bytes of the distinct tensors the store's entries hold."""
    seen = {}
    for e in store.entries:
        for ts in e.full.values():
            for t in ts:
                seen[id(t)] = t.nbytes
        for p in e.pieces:
            seen[("piece", id(p))] = p.nbytes
    return sum(seen.values())


def test_eviction_stays_in_budget_least_recently_used_first(gemma):
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=64)
    g = torch.Generator().manual_seed(0)  # token prompts with no common prefix: a hit touches only its own entry
    prompts = [ModelInputs(torch.randint(1000, 9000, (1, 30 + 5 * i), generator=g)) for i in range(4)]
    probe = PrefixCache(gemma.model.config.text, 1 << 30)
    for p in prompts[:3]:
        logits_of(engine, p, probe)
    budget = probe.bytes + 1024  # room for the first three prompts, not for a fourth, longer one
    store = PrefixCache(gemma.model.config.text, budget)
    keys = [p.token_keys(engine.media_ids) for p in prompts]
    for i in range(3):
        logits_of(engine, prompts[i], store)
        assert store.bytes <= budget and store.bytes == held_bytes(store)
    logits_of(engine, prompts[0], store)  # a hit: prompt 0 becomes the most recently used
    logits_of(engine, prompts[3], store)  # evicts the least recently used: prompt 1, then 2
    assert store.bytes <= budget and store.bytes == held_bytes(store) and store.evictions >= 1
    held = [k for k in keys if any(e.keys == k for e in store.entries)]
    assert keys[0] in held and keys[3] in held and keys[1] not in held and keys[2] not in held
    # an entry bigger than the whole budget is not kept (and evicts nothing)
    tiny = PrefixCache(gemma.model.config.text, 1024)
    logits_of(engine, prompts[0], tiny)
    assert tiny.entries == [] and tiny.bytes == 0


def test_cancel_and_failure_leave_the_store_consistent(gemma, monkeypatch):
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=16)
    s = Scheduler(engine, max_seqs=2, max_len=1024, prefix_cache_mb=64)
    base = gemma.inputs([SYSTEM, user("Item 1?")])
    s.submit(base, GREEDY)
    s.run_until_done()
    before = [(e.keys, e.used) for e in s.prefix.entries], s.prefix.bytes
    # cancelled in the middle of its prefill
    r = s.submit(gemma.inputs([SYSTEM, user("Item 2? " + "more words " * 20)]), GREEDY)
    s.step()
    s.step()
    assert s.prefilling is not None
    r.cancel()
    s.run_until_done()
    assert r.result().finish_reason == "cancelled"
    # a forward that fails in the middle of a prefill
    calls = {"n": 0}
    forward = type(gemma.model).forward

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return forward(self, *a, **kw)
    monkeypatch.setattr(type(gemma.model), "forward", failing)
    r = s.submit(gemma.inputs([SYSTEM, user("Item 3? " + "other words " * 20)]), GREEDY)
    s.run_until_done()
    with pytest.raises(RuntimeError, match="boom"):
        r.result()
    monkeypatch.undo()
    after = [(e.keys, e.used) for e in s.prefix.entries], s.prefix.bytes
    assert [k for k, _ in after[0]] == [k for k, _ in before[0]] and after[1] == before[1]
    assert s.prefix.bytes == held_bytes(s.prefix)
    # and the store still serves exact hits
    inputs = gemma.inputs([SYSTEM, user("Item 4?")])
    got = s.submit(inputs, GREEDY)
    s.run_until_done()
    got = got.result()
    assert got.timings.cached_tokens > 0 and got.token_ids == engine.generate(inputs, GREEDY).token_ids


def test_two_clients_share_a_system_prompt_over_the_server(tmp_path_factory):
    tiny = tiny_gemma(tmp_path_factory.mktemp("prefix"))
    # restore points at chunk bounds: 64-token chunks put several inside this ~260-token system
    # prompt (at the default 512 the second client restores nothing of it, the third all of it)
    tiny.engine.prefill_chunk = 64
    config = ServerConfig(model_name="tiny", max_seqs=2, max_len=1024, prefix_cache_mb=32)
    with Running(create_app(tiny, config)) as server:
        clients = [openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
                   for _ in range(2)]
        kw = dict(model="tiny", max_tokens=4, temperature=0)
        first = clients[0].chat.completions.create(messages=[SYSTEM, {"role": "user", "content": "Hi"}], **kw)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second = clients[1].chat.completions.create(messages=[SYSTEM, {"role": "user", "content": "Hello"}], **kw)
        assert 100 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
        third = clients[0].chat.completions.create(messages=[SYSTEM, {"role": "user", "content": "Hey you"}], **kw)
        assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens
        assert first.choices[0].message.content == clients[0].chat.completions.create(
            messages=[SYSTEM, {"role": "user", "content": "Hi"}], **kw).choices[0].message.content
        stream = clients[1].chat.completions.create(messages=[SYSTEM, {"role": "user", "content": "Hey"}],
                                                    stream=True, stream_options={"include_usage": True}, **kw)
        usage = [c.usage for c in stream if c.usage is not None][-1]
        assert usage.prompt_tokens_details.cached_tokens > 100
        prompt = SYSTEM["content"] + " And so"
        clients[0].completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
        again = clients[1].completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        resp = clients[0].responses.create(model="tiny", instructions=SYSTEM["content"], input="Hi there",
                                           max_output_tokens=16, temperature=0)
        assert resp.usage.input_tokens_details.cached_tokens > 100
        text = httpx.get(server.url + "/metrics").text
        metric = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("unigemma:prefix_cache")}
        assert metric["unigemma:prefix_cache_hits_total"] >= 6
        assert metric["unigemma:prefix_cache_queries_total"] == 8
        assert metric["unigemma:prefix_cache_saved_tokens_total"] > 400
        assert 0 < metric["unigemma:prefix_cache_bytes"] <= metric["unigemma:prefix_cache_budget_bytes"] == 32 << 20


def test_speculative_rows_are_remembered_and_reused(gemma):
    """A reply decoded speculatively (drafts verified, rejected ones rolled back) is remembered
    as it was fed, and the next turn restored from it decodes as plain decoding does."""
    from test_speculative import DRAFTER

    from unigemma.generate.speculative import DraftLength
    from unigemma.models.drafter import Drafter, DrafterConfig

    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.from_dict(DRAFTER)).float().eval()
    engine = Engine(gemma.model, gemma.tokenizer, drafter=drafter, draft=DraftLength(k=3, adaptive=False))
    s = Scheduler(engine, max_seqs=2, max_len=1024, prefix_cache_mb=64)
    messages = [SYSTEM, user("Look up item 4.")]
    for turn in range(2):
        inputs = gemma.inputs(messages)
        got = s.submit(inputs, GREEDY)
        s.run_until_done()
        got = got.result()
        assert got.token_ids == gemma.engine.generate(inputs, GREEDY).token_ids
        assert got.timings.drafted > 0 and (got.timings.cached_tokens > 0) == (turn > 0)
        messages = messages + [{"role": "assistant", "content": got.content}, user("Next item.")]
    assert s.prefix.bytes == held_bytes(s.prefix) <= s.prefix.budget
