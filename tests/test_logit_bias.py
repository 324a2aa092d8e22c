"""logit_bias in SamplingParams (validated) and the Sampler (a per-row bias added before a
grammar's mask, kept right as rows join, leave and reorder)."""

from __future__ import annotations

import pytest
import torch

from unigemma.errors import InputError
from unigemma.generate.sampling import Sampler, SamplingParams


def test_params_normalise_and_validate():
    p = SamplingParams(logit_bias={"7": 5, 3: -100.0, "0": 100})
    assert p.logit_bias == ((0, 100.0), (3, -100.0), (7, 5.0))
    for bad, why in (({"x": 1}, "token id"), ({"-2": 1}, "token id"), ({"1": 100.5}, r"\[-100, 100\]"),
                     ({"1": float("nan")}, "finite"), ({"1": True}, "finite"), ([1, 2], "pairs"),
                     ({str(i): 1 for i in range(301)}, "300"), ("1:5", "map")):
        with pytest.raises(InputError, match=why):
            SamplingParams(logit_bias=bad)


def test_bias_is_per_row_and_follows_rows():
    V = 8
    logits = torch.zeros(3, V)
    logits[:, 2] = 1.0  # greedy picks 2 unless biased
    rows = [SamplingParams(temperature=0, logit_bias={5: 100}), SamplingParams(temperature=0),
            SamplingParams(temperature=0, logit_bias={2: -100, 6: 0.5})]
    s = Sampler(rows, V)
    assert s.sample(logits).tokens.tolist() == [5, 2, 6]
    s.select([2, 0])  # reorder and drop the unbiased row
    assert s.sample(logits[:2]).tokens.tolist() == [6, 5]
    s.add(SamplingParams(temperature=0))
    assert s.sample(logits).tokens.tolist() == [6, 5, 2]
    assert not s.plain


def test_bias_never_revives_a_token_the_grammar_forbids():
    s = Sampler([SamplingParams(temperature=0, logit_bias={1: 100})], 4)
    allowed = torch.tensor([[True, False, True, True]])
    logits = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    assert s.sample(logits, allowed).tokens.tolist() == [2]


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(InputError, match="logit_bias"):
        Sampler([SamplingParams(logit_bias={9: 1})], 8)
