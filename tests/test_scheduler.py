"""Continuous batching: requests that join and leave mid-flight produce what they produce alone;
limits, cancellation and the background thread behave."""

import threading

import pytest
import torch
from messages import img, user

from unigemma.cache.batch import BatchCache, bytes_per_row
from unigemma.errors import InputError, QueueFull
from unigemma.generate.engine import Engine
from unigemma.generate.runner import decode_step
from unigemma.generate.sampling import SamplingParams
from unigemma.generate.scheduler import Scheduler

# A window of 16 in the test model: these prompts and replies wrap the sliding rings.
CONVS = [
    ([user("Hello there! Tell me about the sea and the sky.")], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    ([user(img(4), "What is this?")], SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=9)),
    ([user("Count: one, two,")], SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=14, ignore_eos=True,
                                               repetition_penalty=1.3, logprobs=True, top_logprobs=2)),
    ([user(img(6), "and", img(7), "Compare.")], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def alone(gemma):
    return [gemma.engine.generate(gemma.processor(70)(c), p) for c, p in CONVS]


def same(got, want):
    assert got.token_ids == want.token_ids and got.content == want.content
    assert got.finish_reason == want.finish_reason
    assert [x["token_id"] for x in got.logprobs] == [x["token_id"] for x in want.logprobs]


def test_requests_joining_mid_flight_produce_what_they_produce_alone(gemma, alone):
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=16)  # prompts take several steps
    s = Scheduler(engine, max_seqs=4, max_len=512)
    requests, progress = [], []
    for i, (conv, p) in enumerate(CONVS):
        requests.append(s.submit(gemma.processor(70)(conv), p))
        for _ in range(3 + 2 * i):
            s.step()
            progress.append((s.prefilling is not None, sum(r.timings.completion_tokens for r in s.running)))
    s.run_until_done()
    for r, want in zip(requests, alone):
        same(r.result(), want)
    # decoding went on while later prompts were being prefilled chunk by chunk
    assert any(p0 and p1 and n1 > n0 for (p0, n0), (p1, n1) in zip(progress, progress[1:]))
    assert s.cache.n == 0 and not s.running and s.stats()["kv_tokens_used"] == 0


def test_a_cap_on_rows_queues_the_rest(gemma, alone):
    s = Scheduler(gemma.engine, max_seqs=2, max_len=512)
    requests = [s.submit(gemma.processor(70)(c), p) for c, p in CONVS]
    most = 0
    while s.has_work():
        s.step()
        most = max(most, len(s.running))
        assert s.stats()["running"] <= 2
    assert most == 2
    for r, want in zip(requests, alone):
        same(r.result(), want)


def test_cancel_frees_the_row_and_leaves_the_others_alone(gemma, alone):
    s = Scheduler(gemma.engine, max_seqs=4, max_len=512)
    keep = s.submit(gemma.processor(70)(CONVS[0][0]), CONVS[0][1])
    drop = s.submit(gemma.processor(70)(CONVS[2][0]), CONVS[2][1])
    waiting = s.submit(gemma.processor(70)(CONVS[3][0]), CONVS[3][1])
    waiting.cancel()
    for _ in range(5):
        s.step()
    assert len(s.running) == 2
    drop.cancel()
    s.step()
    assert len(s.running) == 1 and s.cache.n == 1
    s.run_until_done()
    same(keep.result(), alone[0])
    assert list(drop)[-1].finish_reason == "cancelled"
    assert [d.finish_reason for d in waiting] == ["cancelled"]


def test_limits(gemma):
    s = Scheduler(gemma.engine, max_seqs=1, max_len=40, max_queue=2)
    inputs = gemma.processor()([user("Hello")])
    n = inputs["input_ids"].shape[1]
    with pytest.raises(InputError, match="prompt is"):
        s.submit(gemma.processor()([user("word " * 60)]))
    s.submit(inputs, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    r = s.submit(inputs, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    with pytest.raises(QueueFull):
        s.submit(inputs)
    s.run_until_done()
    got = r.result()
    # a row holds 40 tokens: the prompt, then replies until the row is full (the last sampled
    # token needs no slot)
    assert got.finish_reason == "length" and len(got.token_ids) == 40 - n + 1
    assert s.kv_bytes == bytes_per_row(gemma.model.config.text, 40, gemma.model.dtype)


def test_bad_media_fails_one_request_only(gemma, alone):
    s = Scheduler(gemma.engine, max_seqs=4, max_len=512)
    good = s.submit(gemma.processor(70)(CONVS[0][0]), CONVS[0][1])
    bad_inputs = dict(gemma.processor(70)(CONVS[1][0]))
    bad_inputs["pixel_values"] = bad_inputs["pixel_values"][..., :7]
    bad = s.submit(bad_inputs, CONVS[1][1])
    s.run_until_done()
    same(good.result(), alone[0])
    with pytest.raises(InputError, match="pixel values"):
        bad.result()


def test_background_thread_serves_concurrent_submitters(gemma, alone):
    s = Scheduler(gemma.engine, max_seqs=3, max_len=512).start()
    results = [None] * len(CONVS)

    def client(i):
        conv, p = CONVS[i]
        results[i] = s.submit(gemma.processor(70)(conv), p).result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(CONVS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    s.stop()
    for got, want in zip(results, alone):
        same(got, want)


def test_batch_cache_rollback_equals_never_decoding(gemma):
    """Rows of different lengths, one rolled back by 3 tokens and re-decoded: its next hidden
    state equals the one computed before the rollback."""
    m = gemma.model
    engine = gemma.engine
    cache = BatchCache(m.config.text, 2, 128, m.dtype, m.device, reserve=4)
    hs = []
    with torch.inference_mode():
        for text in ("Hello there, a long prompt that wraps the window ring twice over.", "Hi"):
            one, h, _ = engine.prefill(gemma.processor()([user(text)]), [SamplingParams()])
            cache.insert(one)
            hs.append(h)
        tokens = torch.tensor([[5], [6]])
        seq = []
        for t in range(4):
            h = decode_step(m, cache, tokens + t, cache.positions[:, None])[:, -1]
            seq.append(h)
        cache.trim(3, row=0)
        cache.trim(3, row=1)
        for t in range(1, 4):
            h = decode_step(m, cache, tokens + t, cache.positions[:, None])[:, -1]
            torch.testing.assert_close(h, seq[t], rtol=0, atol=1e-5)


def test_call_runs_on_the_scheduler_thread_between_steps(gemma):
    # other work on the model (scoring a prompt) must not race the batch from another thread
    s = Scheduler(gemma.engine, max_seqs=1, max_len=128, max_queue=2)
    assert s.call(lambda: threading.current_thread().name).result() == threading.current_thread().name  # no thread
    s.start()
    try:
        r = s.submit(gemma.processor(70)([user("Hi")]), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        assert s.call(lambda: threading.current_thread().name).result(timeout=60) == "unigemma-scheduler"
        with pytest.raises(ZeroDivisionError):  # the caller gets the exception; the batch goes on
            s.call(lambda: 1 / 0).result(timeout=60)
        assert r.result().finish_reason == "length"
    finally:
        s.stop()
