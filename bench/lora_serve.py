"""Decode speed with LoRA adapters served unmerged, per batch row, against the base in the same run.

The random mid-size checkpoint of bench/checkpoint.py (12B layout scaled down: hidden 1536, 8
layers, real vocabulary; bf16, the packed CPU fast path of `unigemma.load`) gets two random
rank-r adapters on the text decoder's q/k/v/o/gate/up/down (lora/: float32 A and B beside the
packed base, as `serve --lora` runs them). Each configuration decodes D greedy tokens per row
after a P-token prompt in the continuous-batching Scheduler; the figure is the aggregate decode
tokens/s once every row is decoding (prefill excluded), best of --repeats:

  base1_tok_s      one request, the base
  lora1_tok_s      one request under adapter a1                       ratio_lora1_vs_base1
  base4_tok_s      four requests, all the base
  mixed4_tok_s     four rows: base, a1, a2, a1 (2 adapters + base)    ratio_mixed4_vs_base4

One JSON line on stdout with bench/machine.py's machine() info.

    python -m bench.lora_serve [--root runs/bench] [--rank 16] [--prompt-tokens 64] [--decode-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from bench.checkpoint import make_checkpoint
from bench.machine import machine


def decode_rate(gemma, rows: list[str | None], P: int, D: int) -> float:
    """Aggregate decode tokens/s of len(rows) requests (their adapters), all decoding together."""
    from unigemma.generate.sampling import SamplingParams
    from unigemma.generate.scheduler import Scheduler

    s = Scheduler(gemma.engine, max_seqs=len(rows), max_len=P + D + 8, prefix_cache_mb=0)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=D, ignore_eos=True)
    for adapter in rows:
        s.submit({"input_ids": torch.randint(10, 200_000, (1, P), generator=g)}, params, adapter=adapter)
    while s.waiting or s.prefilling is not None or len(s.running) < len(rows):
        s.step()
    tokens, t = s.tokens_out, time.perf_counter()
    s.run_until_done()
    return (s.tokens_out - tokens) / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", help="where bench/checkpoint.py keeps its checkpoints (default runs/bench)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import unigemma
    from unigemma.lora import LoraConfig, add_lora, set_adapter
    from unigemma.quant.kernels import describe
    from unigemma.vocab import gemma4_vocab_gguf

    gemma = unigemma.load(make_checkpoint(args.root), dtype="bfloat16", tokenizer=gemma4_vocab_gguf())
    kernels = describe(gemma.model)
    g = torch.Generator().manual_seed(1)
    for name in ("a1", "a2"):
        params = add_lora(gemma.model, LoraConfig(r=args.rank, alpha=2.0 * args.rank), name=name)
        with torch.no_grad():
            for w in params:  # B non-zero: the adapter's matmuls are real work
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.shape[-1]))
    set_adapter(gemma.model, None)
    configs = {"base1": [None], "lora1": ["a1"], "base4": [None] * 4, "mixed4": [None, "a1", "a2", "a1"]}
    P, D = args.prompt_tokens, args.decode_tokens
    decode_rate(gemma, ["a1", None], P, 4)  # warm-up: kernels for both shapes
    out = {k + "_tok_s": 0.0 for k in configs}
    for _ in range(args.repeats):  # interleaved, so drift hits every configuration alike
        for k, rows in configs.items():
            out[k + "_tok_s"] = max(out[k + "_tok_s"], decode_rate(gemma, rows, P, D))
    out = {k: round(v, 2) for k, v in out.items()}
    out["ratio_lora1_vs_base1"] = round(out["lora1_tok_s"] / out["base1_tok_s"], 3)
    out["ratio_mixed4_vs_base4"] = round(out["mixed4_tok_s"] / out["base4_tok_s"], 3)
    print(json.dumps(dict(bench="lora_serve", dtype="bfloat16", rank=args.rank, prompt_tokens=P, decode_tokens=D,
                          hidden=gemma.config.text.hidden_size, layers=gemma.config.text.num_hidden_layers,
                          **out, kernels=kernels, machine=machine(args.threads))))


if __name__ == "__main__":
    main()
