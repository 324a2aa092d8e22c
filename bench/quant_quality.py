"""Quantization quality at the real 12B widths: int8 / int4 against bf16 on 1,000 positions of text.

The model: the random checkpoint of bench/full_12b.py cut to `--layers` (default 6) layers,
with the real 12B widths and vocabulary. The text: English prose from the Python standard
library's docstrings, tokenized with the real Gemma 4 vocabulary. For each scheme: top-1
agreement of the next-token argmax with bf16, and the mean KL(bf16 || quantized), over the
positions. Random weights give flat, near-tied logits, so these figures are harsher than a
trained model's would be; the trained Gemma 3 270M figures are in tests/test_gemma3.py. One
JSON line.

    python -m bench.quant_quality [--layers 6] [--positions 1000]
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch

from bench.machine import machine


def prose(n_tokens: int, tokenizer) -> list[int]:
    import argparse as a
    import collections
    import json as j
    import logging
    import pathlib
    import subprocess
    import threading
    import unittest

    text = "\n\n".join(inspect.getdoc(m) or "" for m in (
        subprocess, threading, logging, collections, a, j, pathlib, unittest, inspect, subprocess.Popen,
        threading.Thread, logging.Logger, pathlib.Path, unittest.TestCase, collections.OrderedDict))
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens + 1:
        raise SystemExit(f"only {len(ids)} tokens of text; ask for fewer positions")
    return ids[: n_tokens + 1]


@torch.inference_mode()
def logits_of(model, ids: list[int], chunk: int = 256) -> torch.Tensor:
    """Next-token logits (float32) at every position, prefilled in chunks over the KV cache."""
    cache = model.make_cache(1, len(ids))
    out = []
    for a in range(0, len(ids), chunk):
        x = torch.tensor([ids[a:a + chunk]])
        h = model(x, torch.arange(a, a + x.shape[1])[None], cache=cache)
        out.append(model.head(h[0]).float())
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--positions", type=int, default=1000)
    ap.add_argument("--quants", default="int8,int4-g32,int4-g128")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import unigemma
    from bench.full_12b import write_checkpoint
    from unigemma.processing.tokenizer import Tokenizer
    from unigemma.vocab import gemma4_vocab_gguf

    ckpt = write_checkpoint(a.layers)
    ids = prose(a.positions, Tokenizer.from_gguf(gemma4_vocab_gguf()))[:-1]
    ref = logits_of(unigemma.load_model(ckpt, dtype="bfloat16"), ids)
    ref_lp = ref.log_softmax(-1)
    result = dict(bench="quant_quality", checkpoint=ckpt.name, positions=len(ids), layers=a.layers,
                  **machine(a.threads))
    for q in [q for q in a.quants.split(",") if q]:
        got = logits_of(unigemma.load_model(ckpt, dtype="bfloat16", quant=q), ids)
        kl = (ref_lp.exp() * (ref_lp - got.log_softmax(-1))).sum(-1)
        result[f"{q}_top1_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        result[f"{q}_kl_mean"] = float(kl.mean())
        result[f"{q}_kl_p99"] = float(kl.quantile(0.99))
    top2 = ref.topk(2, -1).values
    result["bf16_median_top1_margin"] = float((top2[:, 0] - top2[:, 1]).median())
    result["bf16_distinct_argmax"] = int(ref.argmax(-1).unique().numel())  # 1 would make agreement trivial
    print(json.dumps(result))


if __name__ == "__main__":
    main()
