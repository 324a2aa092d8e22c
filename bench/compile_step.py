"""Eager vs compiled decode step: is `torch.compile` (Inductor) of generate/runner.py's
`decode_step` faster on this CPU?

One conversation, greedy, through the Engine (so through the Scheduler's step and its
BatchCache: the path every request takes), on the random benchmark checkpoint
(bench/checkpoint.py), three ways in one process on the same prompt:

  eager_packed     the default: `unigemma.load(fast=True)`, prepacked oneDNN linears
                   (models/packed.py); their custom op has no Inductor lowering, so this model
                   is not compiled
  eager_plain      `fast=False`: plain nn.Linear modules
  compiled_plain   the same plain modules, the decode step under torch.compile (Inductor's
                   own CPU GEMMs), `Engine(compile_step=True)`

Decode tokens/s is the best of --repeats (the three engines take turns, so a load that drifts
hits them alike) after one warm-up call each (for the compiled engine that call is the compile:
`compile_s`). Also: whether the compiled tokens equal eager_plain's, and
how many graphs Dynamo built and graph breaks it met (one graph, no break: the step is captured
whole and does not recompile as the cache grows). One JSON line.

    python -m bench.compile_step [--dtype bfloat16] [--hidden 1536 --layers 8] [--root runs/bench]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.checkpoint import ROOT, make_checkpoint
from bench.machine import machine
from bench.peers import text_ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--root", default=str(ROOT), help="where the random checkpoints are written (once)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import unigemma
    from torch._dynamo.utils import counters

    from unigemma.generate.engine import Engine
    from unigemma.generate.sampling import SamplingParams
    from unigemma.vocab import gemma4_vocab_gguf

    path = make_checkpoint(a.root, hidden=a.hidden, layers=a.layers)
    inputs = {"input_ids": torch.tensor([text_ids(a.prompt_tokens)])}
    params = SamplingParams(temperature=0.0, max_tokens=a.decode_tokens, ignore_eos=True)

    tokenizer = gemma4_vocab_gguf()
    packed = unigemma.load(path, dtype=a.dtype, tokenizer=tokenizer)
    plain = unigemma.load(path, dtype=a.dtype, tokenizer=tokenizer, fast=False)
    engines = {"eager_packed": packed.engine, "eager_plain": Engine(plain.model, plain.tokenizer),
               "compiled_plain": Engine(plain.model, plain.tokenizer, compile_step=True)}
    out, best, compile_s = {}, dict.fromkeys(engines, 0.0), 0.0
    for name, engine in engines.items():  # warm-up; for the compiled engine, the compile
        counters.clear()
        t = time.perf_counter()
        engine.generate(inputs, params)
        if name == "compiled_plain":
            compile_s = time.perf_counter() - t
    for _ in range(a.repeats):  # interleaved: a load that drifts over the run hits all three alike
        for name, engine in engines.items():
            out[name] = engine.generate(inputs, params)
            best[name] = max(best[name], out[name].timings.decode_tokens_per_s)
    packed_rate, plain_rate, compiled_rate = best["eager_packed"], best["eager_plain"], best["compiled_plain"]
    compiled, eager = out["compiled_plain"], out["eager_plain"]
    result = dict(bench="compile_step", dtype=a.dtype, hidden=a.hidden, layers=a.layers,
                  prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens,
                  eager_packed_decode_tok_s=packed_rate, eager_plain_decode_tok_s=plain_rate,
                  compiled_plain_decode_tok_s=compiled_rate,
                  compiled_over_eager_packed=compiled_rate / packed_rate if packed_rate else 0.0,
                  compiled_over_eager_plain=compiled_rate / plain_rate if plain_rate else 0.0,
                  compile_s=compile_s, identical=compiled.token_ids == eager.token_ids,
                  graphs=int(counters["stats"]["unique_graphs"]),
                  graph_breaks=int(sum(counters["graph_break"].values())),
                  **machine(a.threads), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
