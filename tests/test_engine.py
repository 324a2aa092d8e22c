"""The generation engine: chunked prefill keeps media blocks whole, a session's cached prefix is
reused exactly, batches equal singles, seeds and stops behave."""

import pytest
import torch
from messages import img, user

from unigemma.errors import InputError
from unigemma.generate.engine import Engine
from unigemma.generate.greedy import greedy_generate
from unigemma.generate.sampling import SamplingParams
from unigemma.inputs import chunk_bounds

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_chunk_bounds_never_split_a_block():
    types = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 1, 1, 1, 1, 1, 1, 1, 0]])
    for chunk in range(1, 20):
        bounds = chunk_bounds(types, 0, 18, chunk)
        assert bounds[0][0] == 0 and bounds[-1][1] == 18
        assert all(a < b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:]))
        for a, _ in bounds[1:]:
            assert not (types[0, a - 1] > 0 and types[0, a] > 0 and types[0, a - 1] == types[0, a]), (chunk, a)
    assert chunk_bounds(None, 3, 10, 4) == [(3, 7), (7, 10)]


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_chunked_prefill_equals_one_shot_greedy(gemma, chunk):
    """Images (70-token blocks, longer than some chunks) across chunk boundaries, a window of 16."""
    messages = [user(img(0), "and", img(1), "what differs?")]
    inputs = gemma.inputs(messages, image_budget=70)
    want = greedy_generate(gemma.model, inputs["input_ids"], max_new_tokens=12, stop_ids=[],
                           **{k: v for k, v in inputs.items() if k != "input_ids"})[0].tolist()
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=chunk)
    got = engine.generate(inputs, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert got.token_ids == want and got.finish_reason == "length"


def test_session_reuses_the_cached_prefix_exactly(gemma):
    first = [user(img(2), "Describe it.")]
    session = gemma.session()
    reply1 = gemma.chat(first, params=GREEDY, session=session, image_budget=70)
    assert gemma.session is not None and reply1.timings.cached_tokens == 0
    second = first + [{"role": "assistant", "content": reply1.content}, user("Shorter, please.")]
    reply2 = gemma.chat(second, params=GREEDY, session=session, image_budget=70)
    fresh = gemma.chat(second, params=GREEDY, image_budget=70)
    assert reply2.token_ids == fresh.token_ids
    assert reply2.timings.cached_tokens > 70  # the image and the first question were not prefilled again
    # Same-size image, other pixels: identical token ids, yet nothing from the image on is reused.
    third = [user(img(3), "Describe it.")]
    reply3 = gemma.chat(third, params=GREEDY, session=session, image_budget=70)
    assert reply3.token_ids == gemma.chat(third, params=GREEDY, image_budget=70).token_ids
    boi = gemma.inputs(third, image_budget=70)["input_ids"][0].tolist().index(255999)
    assert reply3.timings.cached_tokens <= boi + 1


def test_batch_equals_each_alone(gemma):
    convs = [[user("Hello there!")], [user(img(4), "What is this?")], [user("Count: one, two,")]]
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=9),
              SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=7, ignore_eos=True)]
    batch = gemma.engine.generate_batch(gemma.processor(70)(convs), params)
    for conv, p, got in zip(convs, params, batch):
        alone = gemma.engine.generate(gemma.processor(70)(conv), p)
        assert got.token_ids == alone.token_ids and got.content == alone.content


def test_seeds(gemma):
    m = [user("Tell me a story.")]
    a = [gemma.chat(m, params=SamplingParams(temperature=1.0, seed=s, max_tokens=10, ignore_eos=True)).token_ids
         for s in (1, 1, 2)]
    assert a[0] == a[1] and a[0] != a[2]
    greedy = [gemma.chat(m, params=SamplingParams(temperature=0.0, seed=s, max_tokens=10)).token_ids for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_stop_string_across_token_boundaries(gemma):
    m = [user("Tell me a story.")]
    free = gemma.chat(m, params=SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    text, ids = free.content, free.token_ids
    pieces = [gemma.tokenizer.decode([i]) for i in ids]
    # a stop string made of the end of token 4 and the start of token 5
    stop = pieces[3][-2:] + pieces[4][:2]
    cut = text.find(stop)
    assert len(stop) >= 3 and cut >= 0
    got = gemma.chat(m, params=SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=(stop,)))
    assert got.content == text[:cut] and got.finish_reason == "stop"


def test_streaming_deltas_add_up(gemma):
    m = [user(img(5), "Go on.")]
    p = SamplingParams(temperature=0.0, max_tokens=10, logprobs=True, top_logprobs=3)
    deltas = list(gemma.stream(m, params=p, image_budget=70))
    whole = gemma.chat(m, params=p, image_budget=70)
    assert "".join(d.content for d in deltas) == whole.content
    assert [i for d in deltas for i in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason in ("stop", "length") and deltas[-1].timings.completion_tokens == len(whole.token_ids)
    lp = [x for d in deltas for x in d.logprobs]
    assert len(lp) == len(whole.token_ids) and all(len(x["top"]) == 3 for x in lp)


def test_context_limit_and_bad_params(gemma):
    with pytest.raises(InputError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InputError, match="one conversation"):
        gemma.engine.stream(gemma.processor()([[user("a")], [user("b")]]), GREEDY).__next__()
