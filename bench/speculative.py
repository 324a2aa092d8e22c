"""Speculative decoding, upper bound: an oracle drafter on the mid-size benchmark model.

The oracle (a test double) proposes the target's own greedy continuation, so every draft is
accepted: what remains is the cost of verifying k + 1 tokens in one target forward instead of
k + 1 forwards. For N = 2, 4, 8 drafts per round: tokens per target forward, decode tokens/s
and the wall-clock speed-up over plain decoding of the same prompt in the same process, and
whether the output was identical. A random-weight MTP drafter of the 12B drafter's shape
(scaled like the model) shows the drafting overhead when nothing is accepted. Real acceptance
needs trained drafter weights (see the README). One JSON line.

Greedy speculative output is identical to plain decoding in both dtypes: in bfloat16 the packed
CPU path is batch-invariant (a verify forward of k + 1 tokens is bit-equal to k + 1 one-token
steps: models/packed.py, attention.py, cache/kv.py), in float32 the two agree to rounding. A
verify forward costs about one decode step in bf16 (the weight reads dominate), more in fp32
(oneDNN's fp32 kernel for 2+ rows reads weights at half the one-row speed).

    python -m bench.speculative [--dtype float32] [--prompt-tokens 128] [--decode-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.checkpoint import make_checkpoint
from bench.machine import machine
from bench.peers import text_ids
from unigemma.generate.speculative import DraftLength, Proposal


class Oracle:
    """Proposes the target's greedy continuation `answer` of a prompt of `prompt_len` tokens."""

    def __init__(self, prompt_len: int, answer: list[int]):
        self.prompt_len, self.answer = prompt_len, answer

    def propose(self, cache, x, h, k, sampler) -> Proposal:
        i = cache.length - self.prompt_len + 1
        tokens = self.answer[i:i + k]
        return Proposal(tokens + [0] * (k - len(tokens)), None)


def random_drafter(target_config, hidden: int):
    from unigemma.models.drafter import Drafter, DrafterConfig

    t = target_config.text
    text = dict(vocab_size=t.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=t.head_dim, global_head_dim=t.head_dim_of("full_attention"),
                num_global_key_value_heads=t.kv_heads_of("full_attention"), attention_k_eq_v=True,
                sliding_window=t.sliding_window, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    cfg = DrafterConfig.from_dict(dict(model_type="gemma4_unified_assistant", text_config=text,
                                       backbone_hidden_size=t.hidden_size))
    torch.manual_seed(0)
    return Drafter(cfg).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import unigemma
    from unigemma.generate.engine import Engine
    from unigemma.generate.sampling import SamplingParams
    from unigemma.vocab import gemma4_vocab_gguf

    gemma = unigemma.load(make_checkpoint(), dtype=a.dtype, tokenizer=gemma4_vocab_gguf())
    inputs = {"input_ids": torch.tensor([text_ids(a.prompt_tokens)])}
    params = SamplingParams(temperature=0.0, max_tokens=a.decode_tokens, ignore_eos=True)

    def rate(engine):
        best, out = 0.0, None
        for _ in range(a.repeats):
            out = engine.generate(inputs, params)
            best = max(best, out.timings.decode_tokens_per_s)
        return best, out

    plain_rate, plain = rate(gemma.engine)
    result = dict(bench="speculative", dtype=a.dtype, prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens,
                  plain_decode_tok_s=plain_rate, **machine(a.threads))
    for n in (2, 4, 8):
        engine = Engine(gemma.model, gemma.tokenizer, draft=DraftLength(k=n, adaptive=False))
        engine.proposer = Oracle(a.prompt_tokens, plain.token_ids)
        r, out = rate(engine)
        result[f"oracle_n{n}_decode_tok_s"] = r
        result[f"oracle_n{n}_speedup"] = r / plain_rate
        result[f"oracle_n{n}_tokens_per_forward"] = out.timings.tokens_per_forward
        result[f"oracle_n{n}_identical"] = out.token_ids == plain.token_ids
    hidden = max(256, gemma.config.text.hidden_size // 4)  # the 12B drafter is 1024 wide for a 3840 target
    engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(gemma.config, hidden).to(gemma.model.dtype),
                    draft=DraftLength(k=2, adaptive=False))
    r, out = rate(engine)
    result.update(random_drafter_hidden=hidden, random_drafter_n2_decode_tok_s=r,
                  random_drafter_n2_speedup=r / plain_rate, random_drafter_acceptance=out.timings.acceptance,
                  random_drafter_identical=out.token_ids == plain.token_ids, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
