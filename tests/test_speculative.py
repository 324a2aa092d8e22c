"""Speculative decoding: greedy output identical to plain decoding whatever the drafts (a random
drafter, an oracle, a half-wrong oracle), the rejection rule samples the target's distribution,
rolled-back drafts leave no trace (sessions, rings, images)."""

import numpy as np
import pytest
import torch
from test_engine import gemma, img, user  # noqa: F401  (fixtures and helpers)
from test_pipeline import checkpoint  # noqa: F401  (the real-vocabulary checkpoint fixture)

from unigemma.config import FULL, SLIDING
from unigemma.generate.engine import Engine
from unigemma.generate.sampling import Sampler, SamplingParams
from unigemma.generate.speculative import DraftLength, MTPProposer, Proposal, accept
from unigemma.models.drafter import Drafter, DrafterConfig

DRAFTER = dict(model_type="gemma4_unified_assistant", backbone_hidden_size=64, text_config=dict(
    vocab_size=262144, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    sliding_window=16, layer_types=[SLIDING] * 3 + [FULL]))


def random_drafter(dtype=torch.float32):
    torch.manual_seed(0)
    return Drafter(DrafterConfig.from_dict(DRAFTER)).to(dtype).eval()


class Oracle(MTPProposer):
    """Proposes the target's own greedy continuation (every `wrong`-th draft corrupted)."""

    def __init__(self, target, drafter, prompt_len: int, answer: list[int], wrong: int = 0):
        super().__init__(target, drafter)
        self.prompt_len, self.answer, self.wrong, self.calls = prompt_len, answer, wrong, 0

    def propose(self, cache, x, h, k, sampler):
        i = cache.length - self.prompt_len + 1  # x is answer[i - 1]
        tokens = list(self.answer[i:i + k]) + [7] * max(0, k - len(self.answer[i:i + k]))
        self.calls += 1
        if self.wrong and self.calls % self.wrong == 0:
            tokens[len(tokens) // 2] += 1
        return Proposal(tokens, None)


PROMPTS = [
    [user("Tell me a long story about the sea, the wind and a lighthouse keeper.")],
    [user(img(1), "What is in this picture, and why?")],  # a 70-token image block, longer than the window
]


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
@pytest.mark.parametrize("kind", ["random", "oracle", "half"])
@pytest.mark.parametrize("k", [1, 3, "adaptive"])
def test_greedy_is_identical_to_plain_decoding(gemma, prompt, kind, k):  # noqa: F811
    p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    inputs = gemma.processor(70)(PROMPTS[prompt])
    plain = gemma.engine.generate(inputs, p)
    draft = DraftLength(k=3, adaptive=True) if k == "adaptive" else DraftLength(k=k, adaptive=False)
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(), draft=draft)
    if kind != "random":
        engine.proposer = Oracle(gemma.model, engine.proposer.drafter, inputs["input_ids"].shape[1],
                                 plain.token_ids, wrong=3 if kind == "half" else 0)
    got = engine.generate(inputs, p)
    assert got.token_ids == plain.token_ids and got.content == plain.content
    t = got.timings
    assert t.verify_forwards > 0 and t.drafted > 0
    if kind == "oracle":
        assert t.acceptance > 0.9 and t.tokens_per_forward > 1.8
    if kind == "half":
        assert 0 < t.acceptance < 1


def test_sessions_stops_and_logprobs_match_plain_decoding(gemma):  # noqa: F811
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter())
    first = [user(img(2), "Describe it.")]
    p = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=2)
    session = engine.session()
    a = engine.generate(gemma.processor(70)(first), p, session)
    assert a.token_ids == gemma.engine.generate(gemma.processor(70)(first), p).token_ids
    assert [x["token_id"] for x in a.logprobs] == a.token_ids and all(len(x["top"]) == 2 for x in a.logprobs)
    second = first + [{"role": "assistant", "content": a.content}, user("Shorter.")]
    b = engine.generate(gemma.processor(70)(second), p, session)
    fresh = gemma.engine.generate(gemma.processor(70)(second), p)
    assert b.token_ids == fresh.token_ids and b.timings.cached_tokens > 70
    text = fresh.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        ps = SamplingParams(temperature=0.0, max_tokens=12, stop=(stop,))
        assert engine.generate(gemma.processor(70)(second), ps).content == \
            gemma.engine.generate(gemma.processor(70)(second), ps).content


def test_seeded_sampling_with_a_drafter_is_reproducible(gemma):  # noqa: F811
    inputs = gemma.processor()(PROMPTS[0])
    p = SamplingParams(temperature=0.9, top_k=50, seed=4, max_tokens=16, ignore_eos=True)
    runs = [Engine(gemma.model, gemma.tokenizer, drafter=random_drafter()).generate(inputs, p).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 16


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                    dict(temperature=1.3, top_p=0.8)])
def test_rejection_rule_samples_the_target_distribution(params):
    """On an 8-token vocabulary: whatever the drafter proposes (from its own q), the first
    emitted token is distributed as the target's processed p (chi-square, 20,000 rounds)."""
    V, n = 8, 20000
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, V, generator=g) * 1.5
    draft_logits = torch.randn(V, generator=g) * 1.5
    sampler = Sampler([SamplingParams(seed=1, **params)], V)
    p = sampler.probs(sampler.process(target[:1]))[0]
    q = sampler.probs(sampler.process(draft_logits[None]))[0]
    counts = np.zeros(V)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for d in drafts:
        got = accept(sampler, target, Proposal([d], q[None]), None)
        counts[got.tokens[0]] += 1
    expected = p.double().numpy() * n
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    assert counts[~keep].sum() <= max(10, expected[~keep].sum() * 3)
    # 99.9% quantile of chi-square with <= 7 degrees of freedom is 24.3
    assert chi2 < 24.3, (chi2, counts, expected)
