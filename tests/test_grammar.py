"""Constrained decoding: the sampler's allowed-token mask and llguidance grammars in the
continuous batcher (a constrained row follows its grammar; the rows beside it are untouched)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from server_helpers import tiny_gemma

from unigemma.errors import InputError
from unigemma.generate.grammar import Grammars
from unigemma.generate.sampling import Sampler, SamplingParams
from unigemma.generate.scheduler import Scheduler

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "tags"], "additionalProperties": False}


def test_allowed_mask_forces_tokens_and_logprobs_see_it():
    sampler = Sampler([SamplingParams(temperature=0, logprobs=True, top_logprobs=2),
                       SamplingParams(temperature=1.0, seed=0)], 10)
    logits = torch.arange(10.0).repeat(2, 1)
    allowed = torch.zeros(2, 10, dtype=torch.bool)
    allowed[0, [2, 3]] = True
    allowed[1, 4] = True
    out = sampler.sample(logits, allowed)
    assert out.tokens.tolist() == [3, 4]
    assert set(out.top_ids[0].tolist()) == {2, 3}  # masked tokens are not alternatives
    assert torch.allclose(out.top_logprobs[0].exp().sum(), torch.tensor(1.0))
    with pytest.raises(InputError, match="allowed must be"):
        sampler.sample(logits, allowed[:, :5])


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return tiny_gemma(tmp_path_factory.mktemp("grammar"))


def test_constrained_rows_follow_the_schema_and_leave_others_alone(gemma):
    grammars = Grammars(gemma.tokenizer, gemma.engine.base_stop_ids, gemma.config.text.vocab_size)
    inputs = gemma.inputs([{"role": "user", "content": "JSON please"}])
    free = SamplingParams(temperature=0.9, seed=5, max_tokens=12)
    alone = Scheduler(gemma.engine, max_seqs=3, max_len=256)
    want = alone.submit(inputs, free)
    alone.run_until_done()
    want = want.result().token_ids

    s = Scheduler(gemma.engine, max_seqs=3, max_len=256)
    constrained = [s.submit(inputs, SamplingParams(temperature=t, seed=i, max_tokens=80),
                            constraint=grammars.json_schema(SCHEMA)) for i, t in enumerate((0.0, 1.0))]
    other = s.submit(inputs, free)
    s.run_until_done()
    assert other.result().token_ids == want
    for r in constrained:
        done = r.result()
        assert done.finish_reason == "stop"
        jsonschema.validate(json.loads(done.content), SCHEMA)


def test_bad_schemas_are_input_errors(gemma):
    grammars = Grammars(gemma.tokenizer, gemma.engine.base_stop_ids, gemma.config.text.vocab_size)
    with pytest.raises(InputError):
        grammars.json_schema({"type": "no-such-type"})
    with pytest.raises(InputError):
        grammars.json_schema([1, 2])


LOOKUP = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"topic": {"enum": ["alpha", "beta", "gamma"]}}, "required": ["topic"]}}}]


def _greedy_call(gemma, params, jump: bool):
    grammars = Grammars(gemma.tokenizer, gemma.engine.base_stop_ids, gemma.config.text.vocab_size)
    inputs = gemma.inputs([{"role": "user", "content": "Look it up"}], tools=LOOKUP)
    s = Scheduler(gemma.engine, max_seqs=2, max_len=256)
    s.forced_tokens = jump
    forwards = []
    step = s.engine.decode_step
    s.engine.decode_step = lambda *a: forwards.append(a[2].shape[1]) or step(*a)
    try:
        r = s.submit(inputs, params, constraint=grammars.tool_call(LOOKUP))
        s.run_until_done()
    finally:
        s.engine.decode_step = step
    return inputs, r.result(), forwards, grammars


def test_jump_forward_emits_forced_tokens_without_their_own_forward(gemma):
    """A forced tool call decoded greedily, alone: the stretches the grammar forces (`<|tool_call>
    call:lookup{topic:` and the quotes) are emitted at once and fed with the sampled token in
    one forward. Checked against full forwards of the whole sequence: each token the model chose
    is the argmax of its logits among the grammar's allowed tokens, each other token is exactly
    what the grammar forced; the call is the same text as without jump-forward, in fewer forwards."""
    params = SamplingParams(temperature=0, max_tokens=60)
    inputs, done, forwards, grammars = _greedy_call(gemma, params, jump=True)
    _, plain, plain_forwards, _ = _greedy_call(gemma, params, jump=False)
    assert done.finish_reason == "tool_calls" and done.timings.forced > 0 and max(forwards) > 1
    assert len(forwards) < len(plain_forwards) and all(n == 1 for n in plain_forwards)
    assert done.content == plain.content
    assert [c["function"] for c in done.tool_calls] == [c["function"] for c in plain.tool_calls]
    replay = grammars.tool_call(LOOKUP)
    prompt = inputs["input_ids"][0].tolist()
    ids, i, chosen = done.token_ids, 0, 0
    while i < len(ids):
        forced = replay.forced() if i else []  # the first token is sampled; forcing starts after it
        if forced and ids[i:i + len(forced)] == forced:
            for t in forced:
                replay.advance(t)
            i += len(forced)
            continue
        with torch.no_grad():
            logits = gemma.model.logits(torch.tensor([prompt + ids[:i]]))[0, -1]
        allowed = replay.allowed()
        assert ids[i] == int(torch.where(allowed, logits.float(), float("-inf")).argmax()), i
        replay.advance(ids[i])
        i, chosen = i + 1, chosen + 1
    assert chosen < len(ids)


def test_no_jump_forward_when_logprobs_are_asked_for(gemma):
    params = SamplingParams(temperature=0, max_tokens=60, logprobs=True)
    _, done, forwards, _ = _greedy_call(gemma, params, jump=True)
    assert done.timings.forced == 0 and all(n == 1 for n in forwards)
