"""The decode loop without weights (tests/mock_model.py, whose next token is known on the host):
the engine's calls and the scheduler's steps produce exactly the rule's tokens, finish for the
right reason, free what they hold, and a stream is the reply handed out as it is made."""

import pytest
import torch
from mock_model import EOS, VOCAB, WINDOW, MockModel, MockTokenizer, greedy_reference, next_token

from unigemma.cache.batch import BatchCache
from unigemma.cache.kv import ring_capacity
from unigemma.config import FULL, SLIDING
from unigemma.errors import InputError
from unigemma.generate.engine import Engine
from unigemma.generate.runner import decode_step
from unigemma.generate.sampling import SamplingParams
from unigemma.generate.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g).tolist()  # no EOS


def as_inputs(ids: list[int]) -> dict:
    return {"input_ids": torch.tensor([ids])}


def ending_with_eos(n: int = 12, within: int = 15) -> list[int]:
    """A prompt whose greedy reply reaches EOS after a few tokens."""
    for seed in range(500):
        p = prompt(seed, n)
        reply = greedy_reference(p, within, {EOS})
        if reply[-1] == EOS and len(reply) > 2:
            return p
    raise AssertionError("no prompt reaches EOS")


@pytest.fixture
def engine():
    return Engine(MockModel(), MockTokenizer(), prefill_chunk=5)


def test_greedy_reply_is_the_rule_across_chunks_and_rings(engine):
    p = prompt(0, 13)  # 3 prefill chunks; the window of 4 wraps the sliding ring many times
    got = engine.generate(as_inputs(p), GREEDY)
    assert got.token_ids == greedy_reference(p, 20) and got.finish_reason == "length"
    assert got.timings.completion_tokens == 20 and got.timings.prompt_tokens == 13


def test_stop_id_ends_the_reply_and_ignore_eos_does_not(engine):
    p = ending_with_eos()
    want = greedy_reference(p, 15, {EOS})
    got = engine.generate(as_inputs(p), SamplingParams(temperature=0.0, max_tokens=15))
    assert got.token_ids == want and got.finish_reason == "stop"
    on = engine.generate(as_inputs(p), SamplingParams(temperature=0.0, max_tokens=len(want) + 3, ignore_eos=True))
    assert on.token_ids == greedy_reference(p, len(want) + 3) and on.finish_reason == "length"
    # a stop id of the request's own, not the tokenizer's
    first = want[0]
    own = engine.generate(as_inputs(p), SamplingParams(temperature=0.0, max_tokens=15, stop_token_ids=(first,),
                                                       ignore_eos=True))
    assert own.token_ids == [first] and own.finish_reason == "stop"


def test_stream_is_generate_handed_out_as_it_is_made(engine):
    p = prompt(1, 9)
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=2)
    whole = engine.generate(as_inputs(p), params)
    m = engine.model
    seen = []
    for delta in engine.stream(as_inputs(p), params):
        seen.append((delta, m.forwards))
    deltas = [d for d, _ in seen]
    assert "".join(d.content for d in deltas) == whole.content
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert [x["token_id"] for d in deltas for x in d.logprobs] == whole.token_ids
    assert deltas[-1].finish_reason == "length" and deltas[-1].timings.completion_tokens == 12
    assert all(d.finish_reason is None for d in deltas[:-1])
    # incremental: the first delta came out before the last token's forwards were run
    assert seen[0][1] < seen[-1][1]


def test_batch_equals_each_alone(engine):
    prompts = [prompt(2, 7), prompt(3, 11), prompt(4, 3)]
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=10, seed=5, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=14)]
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    batch = engine.generate_batch({"input_ids": ids, "attention_mask": mask}, params)
    for p, q, got in zip(prompts, params, batch):
        alone = engine.generate(as_inputs(p), q)
        assert got.token_ids == alone.token_ids and got.finish_reason == alone.finish_reason
    assert batch[0].token_ids == greedy_reference(prompts[0], 20)


def test_session_turns_reuse_the_prefix_and_equal_fresh_replies(engine):
    session = engine.session()
    turn1 = prompt(5, 10)
    a = engine.generate(as_inputs(turn1), GREEDY, session)
    assert a.timings.cached_tokens == 0
    assert session.cache.length == len(turn1) + len(a.token_ids) - 1 == len(session.keys)
    turn2 = turn1 + a.token_ids + [7, 8, 9]
    b = engine.generate(as_inputs(turn2), GREEDY, session)
    assert b.token_ids == greedy_reference(turn2, 20)
    assert b.timings.cached_tokens == len(turn1) + len(a.token_ids) - 1  # all but the reply's last token
    # a turn that rewrites the end of the last one rolls the saved row back (within its reserve)
    turn3 = turn2 + b.token_ids[:-4] + [5]
    c = engine.generate(as_inputs(turn3), GREEDY, session)
    assert c.token_ids == greedy_reference(turn3, 20) and c.timings.cached_tokens == len(turn3) - 1


def test_the_context_limit_ends_a_reply_with_length():
    engine = Engine(MockModel(context=30), MockTokenizer())
    p = prompt(6, 12)
    got = engine.generate(as_inputs(p), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    # the row holds 30 tokens: the prompt, then the reply (its last sampled token needs no slot)
    assert got.finish_reason == "length" and got.token_ids == greedy_reference(p, 30 - 12 + 1)
    with pytest.raises(InputError, match="context"):
        engine.generate(as_inputs(prompt(6, 30)), GREEDY)
    with pytest.raises(InputError, match="one conversation"):
        next(engine.stream({"input_ids": torch.zeros(2, 3, dtype=torch.long)}))


def test_requests_joining_mid_flight_produce_what_they_produce_alone(engine):
    prompts = [prompt(7, 6), prompt(8, 14), prompt(9, 4), prompt(10, 9)]
    params = [GREEDY, SamplingParams(temperature=0.7, seed=1, max_tokens=15, ignore_eos=True,
                                     repetition_penalty=1.3), GREEDY, SamplingParams(temperature=0.0, max_tokens=5)]
    alone = [engine.generate(as_inputs(p), q) for p, q in zip(prompts, params)]
    s = Scheduler(engine, max_seqs=3, max_len=64)
    requests = []
    for i, (p, q) in enumerate(zip(prompts, params)):
        requests.append(s.submit(as_inputs(p), q))
        for _ in range(i + 2):
            s.step()
            assert len(s.running) <= 3 and s.cache.n == len(s.running) == len(s.sampler)
    s.run_until_done()
    for r, want in zip(requests, alone):
        got = r.result()
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert s.cache.n == 0 and s.stats()["kv_tokens_used"] == 0
    assert s.stats()["completion_tokens"] == sum(len(w.token_ids) for w in alone)


def test_cancel_frees_the_row_and_leaves_the_others_alone(engine):
    keep_p, drop_p = prompt(11, 5), prompt(12, 8)
    s = Scheduler(engine, max_seqs=2, max_len=64)
    keep = s.submit(as_inputs(keep_p), GREEDY)
    drop = s.submit(as_inputs(drop_p), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    waiting = s.submit(as_inputs(prompt(13, 4)), GREEDY)
    waiting.cancel()
    for _ in range(6):
        s.step()
    assert len(s.running) == 2
    drop.cancel()
    s.step()
    assert len(s.running) == 1 and s.cache.n == 1 and len(s.sampler) == 1
    s.run_until_done()
    assert keep.result().token_ids == greedy_reference(keep_p, 20)
    assert list(drop)[-1].finish_reason == "cancelled"
    assert [d.finish_reason for d in waiting] == ["cancelled"]
    assert s.cache.n == 0 and not s.has_work()


def test_a_failed_step_fails_its_rows_and_the_scheduler_goes_on(engine, monkeypatch):
    s = Scheduler(engine, max_seqs=2, max_len=64)
    first = s.submit(as_inputs(prompt(14, 5)), GREEDY)
    for _ in range(3):
        s.step()

    def boom(*a, **k):
        raise MemoryError("simulated")

    monkeypatch.setattr(engine, "decode_step", boom)
    s.step()
    with pytest.raises(MemoryError):
        first.result()
    monkeypatch.undo()
    p = prompt(15, 6)
    second = s.submit(as_inputs(p), GREEDY)
    s.run_until_done()
    assert second.result().token_ids == greedy_reference(p, 20)


def test_both_caches_speak_one_protocol():
    """trim(n, row), kv_for(layer, row), positions and the ring rule, on a KVCache and on a
    row of a BatchCache holding the same tokens; a row saved back out is the cache it came from."""
    m = MockModel()
    c = m.config.text
    p = prompt(16, 23)
    one = m.make_cache(1, 40, reserve=3)
    batch = BatchCache(c, 2, 40, m.dtype, reserve=3)
    assert one.capacity == batch.capacity == ring_capacity(40, WINDOW, 3) == {FULL: 40, SLIDING: WINDOW - 1 + 3}
    with torch.inference_mode():
        other = m.make_cache(1, 40, reserve=3)
        m(torch.tensor([prompt(17, 9)]), torch.arange(9)[None], cache=other)
        batch.insert(other)  # row 0: another conversation
        m(torch.tensor([p]), torch.arange(23)[None], cache=one)
        r = batch.insert(one)
        assert r == 1 and batch.positions.tolist() == [9, 23] and one.positions.tolist() == [23]
        for layer in range(2):
            for a, b in zip(one.kv_for(layer), batch.kv_for(layer, row=1)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        h = [decode_step(m, cache, torch.tensor(tokens), cache.positions[:, None] + torch.arange(2))
             for cache, tokens in ((one, [[5, 6]]), (batch, [[1, 2], [5, 6]]))]
        assert int(h[0][0, -1].argmax()) == int(h[1][1, -1].argmax()) == next_token(p + [5, 6])
        one.trim(2)
        batch.trim(2, row=1)
        assert not one.can_trim(4) and not batch.can_trim(4, row=1)  # a ring of 3 spare slots
        saved = m.make_cache(1, 30, reserve=3)
        batch.save(1, saved)
        assert saved.length == one.length == 23 and saved.max_len == 30
        for layer in range(2):
            k, v, idx = saved.kv_for(layer)
            k1, v1, idx1 = one.kv_for(layer)
            n = idx.shape[0]  # the saved cache's full layer holds 30 slots, the source 40
            seen = idx >= 0
            assert torch.equal(idx, idx1[:n]) and torch.equal(k[:, :, seen], k1[:, :, :n][:, :, seen])
        with pytest.raises(ValueError, match="reserve"):
            batch.save(1, m.make_cache(1, 40, reserve=8))  # would promise more rollback than the batch ring holds
