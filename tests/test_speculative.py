"""Speculative decoding: greedy output identical to plain decoding whatever the drafts (a random
drafter, an oracle, a half-wrong oracle), the rejection rule samples the target's distribution,
rolled-back drafts leave no trace (sessions, rings, images)."""

import numpy as np
import pytest
import torch
from messages import img, user

from unigemma.config import FULL, SLIDING
from unigemma.errors import InputError
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


def steady_clock(fn, *args):
    """speculative.timed with modelled times: a verify forward 1.0 s, each drafted token 0.05 s."""
    out = fn(*args)
    return out, 0.05 * args[3] if args else 1.0


PROMPTS = [
    [user("Tell me a long story about the sea, the wind and a lighthouse keeper.")],
    [user(img(1), "What is in this picture, and why?")],  # a 70-token image block, longer than the window
]


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
@pytest.mark.parametrize("kind", ["random", "oracle", "half"])
@pytest.mark.parametrize("k", [1, 3, "adaptive"])
def test_greedy_is_identical_to_plain_decoding(gemma, prompt, kind, k, monkeypatch):
    if k == "adaptive":  # the adaptive length weighs measured times: give it a steady clock, not the
        # shared machine's (under load it once judged the drafts not worth their time: 1.34 tokens a forward)
        monkeypatch.setattr("unigemma.generate.speculative.timed", steady_clock)
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


def test_sessions_stops_and_logprobs_match_plain_decoding(gemma):
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


def test_seeded_sampling_with_a_drafter_is_reproducible(gemma):
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


# -- the scheduler (the server's path): a request alone speculates, others join batched -----
def _scheduled(engine, inputs, params, steps_between=0, max_len=512):
    from unigemma.generate.scheduler import Scheduler

    s = Scheduler(engine, max_seqs=3, max_len=max_len)
    requests = []
    for x, p in zip(inputs, params):
        requests.append(s.submit(x, p))
        for _ in range(steps_between):
            s.step()
    s.run_until_done()
    assert s.cache.n == 0 and s.solo is None
    return s, [r.result() for r in requests]


def test_scheduler_speculates_for_a_request_alone(gemma):
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=True, top_logprobs=2)
    inputs = gemma.processor(70)(PROMPTS[1])
    plain = gemma.engine.generate(inputs, p)
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(), draft=DraftLength(k=3, adaptive=False))
    engine.proposer = Oracle(gemma.model, engine.proposer.drafter, inputs["input_ids"].shape[1], plain.token_ids)
    s, (got,) = _scheduled(engine, [inputs], [p])
    assert got.token_ids == plain.token_ids and got.content == plain.content
    assert [x["token_id"] for x in got.logprobs] == got.token_ids
    assert got.timings.acceptance > 0.9 and got.timings.tokens_per_forward > 3
    assert s.stats()["drafted_tokens"] == got.timings.drafted > 0


def test_scheduler_leaves_speculation_when_others_join(gemma):
    convs = [PROMPTS[0], [user("Count: one, two,")], PROMPTS[1]]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=5, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, stop=(".",))]
    inputs = [gemma.processor(70)(c) for c in convs]
    alone = [gemma.engine.generate(x, q) for x, q in zip(inputs, params)]
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(), draft=DraftLength(k=2, adaptive=False))
    _, got = _scheduled(engine, inputs, params, steps_between=6)
    assert got[0].token_ids == alone[0].token_ids and got[2].content == alone[2].content
    assert got[0].timings.drafted > 0  # it speculated before the others came
    assert len(got[1].token_ids) == 30  # sampled: its own seed, not the same stream as alone


def test_scheduler_speculating_up_to_the_end_of_the_row(gemma):
    inputs = gemma.processor(70)(PROMPTS[0])
    n = inputs["input_ids"].shape[1]
    p = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    _, (plain,) = _scheduled(gemma.engine, [inputs], [p], max_len=n + 20)
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(), draft=DraftLength(k=4, adaptive=False))
    engine.proposer = Oracle(gemma.model, engine.proposer.drafter, n, plain.token_ids)
    _, (got,) = _scheduled(engine, [inputs], [p], max_len=n + 20)
    assert got.token_ids == plain.token_ids and got.finish_reason == plain.finish_reason == "length"
    assert got.timings.accepted > 10


def test_scheduler_cancel_while_speculating(gemma):
    from unigemma.generate.scheduler import Scheduler

    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter())
    s = Scheduler(engine, max_seqs=2, max_len=512)
    r = s.submit(gemma.processor(70)(PROMPTS[0]), SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    while s.solo is None:
        s.step()
    r.cancel()
    s.run_until_done()
    assert r.result().finish_reason == "cancelled" and s.cache.n == 0 and s.solo is None


# -- bf16: the fast path is batch-invariant, so drafting changes nothing, bit for bit ---------
@pytest.fixture(scope="module")
def gemma3_bf16(tmp_path_factory):
    import unigemma
    from test_gemma3 import write_gemma3

    from unigemma.models.packed import device_can_pack

    if not device_can_pack("cpu", torch.bfloat16):
        pytest.skip("needs oneDNN bf16 (AVX512-BF16): the packed kernels are what make bf16 batch-invariant")
    path = tmp_path_factory.mktemp("gemma3-bf16")
    # head dim 256 as the real models: PyTorch's bf16 SDPA sums differently below 4 queries there
    write_gemma3(path, hidden_size=256, intermediate_size=1024, head_dim=256, num_attention_heads=4,
                 num_key_value_heads=1, sliding_window=24, query_pre_attn_scalar=256)  # 7 layers: 6 sliding, 1 full
    return unigemma.load_model(path, dtype="bfloat16")  # fast: packed


def steps_equal_verify(model, vocab: int):
    """8 one-token steps after a 60-token prompt (crossing the 64-key block) against verify
    forwards of their first 2..8 tokens: logits bit-equal."""
    g = torch.Generator().manual_seed(0)
    prompt, extra = torch.randint(0, vocab, (1, 60), generator=g), torch.randint(0, vocab, (1, 8), generator=g)
    with torch.inference_mode():
        cache = model.make_cache(1, 256)
        model(prompt, torch.arange(60)[None], cache=cache)
        singles = torch.cat([model.head(model(extra[:, j:j + 1], torch.tensor([[60 + j]]), cache=cache))
                             for j in range(8)], 1)
        for n in range(2, 9):
            cache.trim(cache.length - 60)
            verify = model.head(model(extra[:, :n], torch.arange(60, 60 + n)[None], cache=cache))
            assert torch.equal(singles[:, :n], verify), n


def test_bf16_one_token_steps_equal_a_verify_forward_bit_for_bit(gemma3_bf16):
    steps_equal_verify(gemma3_bf16, 512)


def test_bf16_greedy_with_a_drafter_is_identical_on_the_packed_gemma3(gemma3_bf16):
    from unigemma.processing.tokenizer import Tokenizer
    from unigemma.vocab import gemma4_vocab_gguf

    model, tok = gemma3_bf16, Tokenizer.from_gguf(gemma4_vocab_gguf())  # any Gemma vocabulary covers ids < 512
    cfg = dict(DRAFTER, backbone_hidden_size=256, text_config=dict(
        DRAFTER["text_config"], vocab_size=512, num_key_value_heads=1, head_dim=256, global_head_dim=256,
        num_global_key_value_heads=1, attention_k_eq_v=False, sliding_window=24))
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig.from_dict(cfg)).to(torch.bfloat16).eval()
    p = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    for prompt in ([2, 5, 9, 11, 300, 7], [2] + list(range(100, 170))):
        x = {"input_ids": torch.tensor([prompt])}
        plain = Engine(model, tok).generate(x, p)
        for k in (1, 3, 6):
            engine = Engine(model, tok, drafter=drafter, draft=DraftLength(k=k, adaptive=False))
            engine.proposer = Oracle(model, drafter, len(prompt), plain.token_ids, wrong=2)
            got = engine.generate(x, p)
            assert got.token_ids == plain.token_ids, (prompt[:3], k)
            assert got.timings.accepted > 0


def test_bf16_gemma4_one_token_steps_equal_a_verify_forward_bit_for_bit(tmp_path):
    """The Gemma 4 decoder too: packed linears, decode_attention padded to 8 rows per KV head,
    keys in whole blocks — whatever the number of tokens in a step."""
    import unigemma
    from unigemma.models.packed import device_can_pack
    from unigemma.weights.random import write_random_checkpoint

    if not device_can_pack("cpu", torch.bfloat16):
        pytest.skip("needs oneDNN bf16 (AVX512-BF16): the packed kernels are what make bf16 batch-invariant")
    text = dict(model_type="gemma4_unified_text", vocab_size=1024, hidden_size=256, intermediate_size=512,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=128, global_head_dim=256,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=24,
                layer_types=[SLIDING, SLIDING, SLIDING, FULL])
    write_random_checkpoint(dict(model_type="gemma4_unified", text_config=text), tmp_path / "g4", seed=0)
    steps_equal_verify(unigemma.load_model(tmp_path / "g4", dtype="bfloat16", pack=True), 1024)


def test_adaptive_drafting_turns_itself_off_where_drafts_do_not_pay_and_back_on():
    """A plain step is measured first; with 10% of drafts accepted and a verify row costing half
    a plain step, every k loses to plain decoding: k = 0, but for a draft round every `probe`
    rounds. When acceptance rises the drafts come back."""
    d = DraftLength(k=3, adaptive=True, probe=8)
    assert d.next() == 0  # nothing measured yet: one plain step first
    d.update(0, 0, 0.0, 0.010)
    ks = []
    for _ in range(40):
        k = d.next()
        ks.append(k)
        if k:  # low acceptance, costly verify rows
            d.update(k, int(k * 0.1), 0.001 * k, 0.010 + 0.005 * k)
        else:
            d.update(0, 0, 0.0, 0.010)
    assert ks[-16:].count(0) >= 14, ks  # off, probing now and then
    assert any(ks[-16:]), ks
    for _ in range(40):  # the drafts start landing: cheap verify rows, all accepted
        k = d.next()
        d.update(k, k, 0.0005 * k, 0.010 + 0.0005 * k) if k else d.update(0, 0, 0.0, 0.010)
    assert d.next() > 1 and d.gain(d.history[-1]) > 1


def test_adaptive_draft_length_rejects_bad_settings():
    for bad in (dict(probe=0), dict(max_k=0), dict(k=True)):
        with pytest.raises(InputError):
            DraftLength(**bad)


@pytest.mark.skipif(__import__("unigemma.quant.kernels", fromlist=["plan"]).plan().int8_act is None,
                    reason="qdot.c was not built (no C compiler at install)")
@pytest.mark.parametrize("quant", ["int8", "int4-g32"])
def test_greedy_with_int8_activation_kernels_is_identical_to_plain_decoding(checkpoint, quant):
    """The int8-activation kernels round activations, but each row on its own: a verify forward
    of k + 1 rows equals k + 1 one-token steps, so drafted output is plain decoding's, token for
    token (bf16, where float kernels would need oneDNN's batch-invariant packing)."""
    import unigemma
    from unigemma.quant.kernels import describe

    gemma = unigemma.load(checkpoint, dtype="bfloat16", quant=quant)
    assert any(k.startswith("int8-act") for k in describe(gemma.model))
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    inputs = gemma.processor(70)(PROMPTS[0])
    plain = gemma.engine.generate(inputs, p)
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(torch.bfloat16),
                    draft=DraftLength(k=3, adaptive=False))
    engine.proposer = Oracle(gemma.model, engine.proposer.drafter, inputs["input_ids"].shape[1], plain.token_ids,
                             wrong=3)
    got = engine.generate(inputs, p)
    assert got.token_ids == plain.token_ids
    assert 0 < got.timings.acceptance < 1
