"""Sampling: the truncation helpers on hand-made logits, penalties against hand-computed
values, the sampler's determinism and distribution, logprobs, rows joining and leaving, and
parameter validation."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unigemma.errors import InputError
from unigemma.generate.sampling import (Sampler, SamplingParams, apply_min_p, apply_penalties,
                                        apply_top_k, apply_top_p)

INF = float("-inf")


def kept(x):
    return set(torch.nonzero(x[0] > INF).flatten().tolist())


def run(sampler, logits, steps):
    """Sample `steps` tokens per row from the same logits, observing each: [B, steps]."""
    out = []
    for _ in range(steps):
        tok = sampler.sample(logits).tokens
        sampler.observe(tok)
        out.append(tok)
    return torch.stack(out, 1)


# --- helpers ------------------------------------------------------------------------------
def test_top_k_keeps_exactly_k_per_row():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([1, 5, 0, 80])  # 0 is off; k > V keeps all
    # max_k (every row on, k bounded) takes the top-k path instead of the full sort
    for rows, max_k in ((slice(None), None), (slice(0, 2), 5)):
        y = apply_top_k(x[rows], k[rows], max_k)
        for r, (xr, kr) in enumerate(zip(x[rows], k[rows].tolist())):
            live = y[r] > INF
            assert set(torch.nonzero(live).flatten().tolist()) == set(xr.argsort(descending=True)[:kr or 50].tolist())
            assert torch.equal(y[r][live], xr[live])  # survivors untouched


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    for p, want in [(0.4, {0}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        assert kept(apply_top_p(x, torch.tensor([p]))) == want, p
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 40, generator=g) * 2
    p = torch.rand(8, generator=g) * 0.9 + 0.05
    y = apply_top_p(x, p)
    for r in range(8):
        pr, order = x[r].softmax(-1).sort(descending=True)
        n = int((pr.cumsum(-1) < p[r]).sum()) + 1  # fewest tokens whose mass reaches p
        assert set(torch.nonzero(y[r] > INF).flatten().tolist()) == set(order[:n].tolist())


def test_min_p_threshold_relative_to_max_prob():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])
    x = probs.log()
    for m, want in [(0.0, {0, 1, 2, 3, 4}), (0.14, {0, 1, 2, 3}), (0.45, {0, 1, 2}), (0.76, {0}), (1.0, {0})]:
        assert kept(apply_min_p(x, torch.tensor([m]))) == want, m


def test_penalties_match_hand_computed_values():
    x = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    counts = torch.tensor([[2, 1, 0, 0, 0]], dtype=torch.int32)
    seen = torch.tensor([[False, False, False, True, False]])  # prompt-only token 3
    y = apply_penalties(x, counts, seen, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    want = [2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, -3.0 * 2, 1.0]
    assert torch.allclose(y, torch.tensor([want]))
    neutral = apply_penalties(x, counts, seen, torch.ones(1), torch.zeros(1), torch.zeros(1))
    assert torch.equal(neutral, x)


def test_sampler_penalties_use_prompt_and_output():
    s = Sampler([SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0,
                                frequency_penalty=0.5)], 6)
    s.observe_prompt(0, torch.tensor([1, 1, 4]))
    s.observe(torch.tensor([2]))
    s.observe(torch.tensor([2]))
    s.observe(torch.tensor([4]))
    x = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.6, 0.0]])
    want = torch.tensor([[1.0, 3.0 / 1.5, 2.0 / 1.5 - 1.0 - 1.0, -1.0, 0.6 / 1.5 - 1.0 - 0.5, 0.0]])
    assert torch.allclose(s.process(x), want)


# --- masks ---------------------------------------------------------------------------------
def test_suppressed_tokens_never_sampled():
    x = torch.tensor([[5.0, 4.0, 0.0, -1.0, 1.0, 0.5]])
    s = Sampler([SamplingParams(temperature=2.0, seed=3, suppress_tokens=[0, 1])], 6)
    drawn = run(s, x, 1000)
    assert not torch.isin(drawn, torch.tensor([0, 1])).any()
    assert len(drawn.unique()) == 4
    greedy = Sampler([SamplingParams(temperature=0, suppress_tokens=(0,))], 6)
    assert greedy.sample(x).tokens.tolist() == [1]


def test_min_tokens_masks_stop_ids():
    x = torch.tensor([[0.0, 9.0, 8.0, 1.0, 7.0]])  # eos 1 first, then stop id 2
    s = Sampler([SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2]),
                 SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2], ignore_eos=True),
                 SamplingParams(temperature=0)], 5, eos_ids=[1])
    assert run(s, x.expand(3, 5), 5).tolist() == [[4, 4, 4, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


# --- determinism and distribution -----------------------------------------------------------
def test_temperature_zero_is_argmax_and_ignores_seed():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    for seed in (None, 0, 123):
        s = Sampler([SamplingParams(temperature=0, seed=seed, top_p=0.5)] * 3, 1000)
        assert torch.equal(s.sample(x).tokens, x.argmax(-1))
    assert torch.equal(Sampler([SamplingParams(top_k=1, seed=9)], 1000).sample(x[:1]).tokens, x[:1].argmax(-1))


def test_same_seed_same_tokens_different_seeds_differ():
    x = torch.zeros(1, 50)
    a, b, c = ([SamplingParams(seed=s, top_p=0.9, min_p=0.01)] for s in (7, 7, 8))
    ta, tb, tc = (run(Sampler(p, 50), x, 40) for p in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    assert not torch.equal(run(Sampler([SamplingParams()], 50), x, 40), run(Sampler([SamplingParams()], 50), x, 40))


@pytest.mark.parametrize("params", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=4, top_p=0.9),
])
def test_empirical_frequencies_match_distribution(params):
    x = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    rows, steps = 250, 80
    s = Sampler([SamplingParams(seed=i, **params) for i in range(rows)], 6)
    counts = torch.bincount(run(s, x.expand(rows, 6), steps).flatten(), minlength=6).double()
    y = x / params["temperature"]
    if "top_k" in params:
        y = apply_top_p(apply_top_k(y, torch.tensor([params["top_k"]])), torch.tensor([params["top_p"]]))
    p = y.softmax(-1)[0].double()
    n = rows * steps
    live = p > 0
    assert counts[~live].sum() == 0  # truncated tokens never drawn
    chi2 = float((((counts - n * p) ** 2)[live] / (n * p[live])).sum())
    dof = int(live.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, counts, n * p)  # far out in the tail if wrong


def test_batched_rows_equal_rows_alone():
    g = torch.Generator().manual_seed(4)
    V = 300
    x = torch.randn(4, V, generator=g) * 3
    params = [SamplingParams(seed=1, temperature=0.8, top_k=20),
              SamplingParams(temperature=0),
              SamplingParams(seed=2, top_p=0.7, repetition_penalty=1.3, frequency_penalty=0.4),
              SamplingParams(seed=3, min_p=0.05, suppress_tokens=[5], min_tokens=2)]
    prompts = [torch.arange(10), torch.arange(5), torch.arange(20, 40), torch.arange(3)]
    s = Sampler(params, V, eos_ids=[0])
    for r, ids in enumerate(prompts):
        s.observe_prompt(r, ids)
    together = run(s, x, 25)
    for r, p in enumerate(params):
        alone = Sampler([p], V, eos_ids=[0])
        alone.observe_prompt(0, prompts[r])
        assert torch.equal(run(alone, x[r:r + 1], 25)[0], together[r]), r


def test_rows_join_and_leave_between_steps():
    V = 100
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(5))
    pa, pb, pc = (SamplingParams(seed=s, presence_penalty=0.5 * s) for s in (1, 2, 3))
    s = Sampler([pa, pb], V)
    first = run(s, x.expand(2, V), 6)
    s.remove(0)  # b moves to row 0
    assert s.add(pc, prompt_ids=[1, 2]) == 1
    second = run(s, x.expand(2, V), 6)
    assert torch.equal(torch.cat([first[1], second[0]]), run(Sampler([pb], V), x, 12)[0])
    assert torch.equal(second[1], run(Sampler([pc], V), x, 6)[0])
    with pytest.raises(InputError, match="row"):
        s.remove(2)


def test_sample_never_syncs_with_host(monkeypatch):
    class NoSync(TorchDispatchMode):
        """Fails on ops whose result depends on tensor values read back by the host."""
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            assert not any(k in name for k in ("_local_scalar_dense", "nonzero", "masked_select")), func
            if name.startswith("aten.index.") or name.startswith("aten.index_put"):  # boolean-mask indexing
                assert not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]), func
            return func(*args, **(kwargs or {}))

    s = Sampler([SamplingParams(seed=1, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                                suppress_tokens=[3], min_tokens=2, logprobs=True, top_logprobs=3),
                 SamplingParams(temperature=0)], 50, eos_ids=[0])
    s.observe_prompt(0, [1, 2])
    x = torch.randn(2, 50)
    for name in ("tolist", "item", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a: pytest.fail(f"host sync: {name}"))
    with NoSync():
        for _ in range(3):
            s.observe(s.sample(x).tokens)


# --- logprobs ------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_after_masks_and_penalties():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 40, generator=g).to(torch.float16)
    params = [SamplingParams(seed=1, temperature=0.5, top_k=3, logprobs=True, top_logprobs=5,
                             suppress_tokens=[7], frequency_penalty=1.0),
              SamplingParams(temperature=0, logprobs=True),
              SamplingParams(seed=2)]
    s = Sampler(params, 40)
    s.observe(torch.tensor([9, 9, 9]))
    out = s.sample(x)
    y = x.float()
    y[0, 7] = INF
    y[0, 9] -= 1.0
    want = y.log_softmax(-1)
    assert torch.allclose(out.logprobs, want.gather(1, out.tokens[:, None])[:, 0])
    host = out.host_logprobs()
    assert host[2] is None and host[1]["top"] == []
    assert host[1]["token_id"] == int(x[1].float().argmax())
    top = want[0].topk(5)
    assert [i for i, _ in host[0]["top"]] == top.indices.tolist()
    assert torch.allclose(torch.tensor([lp for _, lp in host[0]["top"]]), top.values)
    assert Sampler([SamplingParams()], 40).sample(x[:1]).logprobs is None


# --- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,shown", [
    ("max_tokens", 0, "0"), ("max_tokens", 2.5, "2.5"), ("max_tokens", True, "True"),
    ("temperature", -0.1, "-0.1"), ("temperature", float("nan"), "nan"), ("top_k", -1, "-1"),
    ("top_p", 0.0, "0.0"), ("top_p", 1.5, "1.5"), ("min_p", 1.1, "1.1"), ("repetition_penalty", 0, "0"),
    ("presence_penalty", 2.5, "2.5"), ("frequency_penalty", -3, "-3"), ("seed", -1, "-1"),
    ("seed", "7", "'7'"), ("stop", [1], "1"), ("stop", [""], "''"), ("stop_token_ids", [-1], "-1"),
    ("stop_token_ids", "12", "'12'"), ("suppress_tokens", [1.5], "1.5"), ("ignore_eos", 1, "1"),
    ("logprobs", "yes", "'yes'"), ("top_logprobs", 21, "21"), ("min_tokens", -1, "-1"),
    ("min_tokens", 300, "300"),
])
def test_validation_names_field_and_value(field, value, shown):
    kw = {field: value, **({"logprobs": True} if field == "top_logprobs" else {})}
    with pytest.raises(InputError, match=field) as e:
        SamplingParams(**kw)
    assert str(e.value).endswith(shown), str(e.value)


def test_params_normalise_and_sampler_checks_ids():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4], suppress_tokens=[1], temperature=1)
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4) and p.suppress_tokens == (1,)
    assert isinstance(p.temperature, float) and not p.is_greedy and SamplingParams(top_k=1).is_greedy
    with pytest.raises(InputError, match="top_logprobs"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(InputError, match="suppress_tokens.*50"):
        Sampler([SamplingParams(suppress_tokens=[50])], 50)
    with pytest.raises(InputError, match="logits"):
        Sampler([SamplingParams()], 50).sample(torch.zeros(2, 50))


def test_from_generation_config():
    cfg = {"do_sample": True, "temperature": 0.9, "top_k": 64, "top_p": 0.95, "repetition_penalty": 1.1,
           "eos_token_id": [1, 106], "suppress_tokens": [5], "max_new_tokens": 100, "pad_token_id": 0}
    p = SamplingParams.from_generation_config(cfg, top_p=0.8)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens) == (0.9, 64, 0.8, 1.1, 100)
    assert p.stop_token_ids == (1, 106) and p.suppress_tokens == (5,)
    assert SamplingParams.from_generation_config({**cfg, "do_sample": False}).is_greedy
    assert SamplingParams.from_generation_config({"temperature": 0.5}).temperature == 0  # HF: no do_sample
    assert SamplingParams.from_generation_config(cfg, ignore_eos=True).stop_token_ids == ()
    assert SamplingParams.from_generation_config({"eos_token_id": 1}).stop_token_ids == (1,)
    with pytest.raises(InputError, match="tempreature"):
        SamplingParams.from_generation_config(cfg, tempreature=1.0)
