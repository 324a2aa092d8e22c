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
