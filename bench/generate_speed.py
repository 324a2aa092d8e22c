"""Generation speed: unigemma vs transformers vs llama.cpp, on the same random weights.

Writes (once) the random mid-size checkpoint of bench/checkpoint.py (real vocabulary, 12B layout
scaled down: hidden 1536, 8 layers, ~730 M parameters) and its GGUF conversions, then measures
each engine in its own process (so peak RSS figures do not mix; ours runs `unigemma.load`, the
packed CPU fast path, and its Engine; every process runs with torch.set_num_threads(threads) /
n_threads=threads):

  ttft_text_s     time to first token, P-token random text prompt (prefill_tok_s = P / ttft_text_s)
  decode_tok_s    (D - 1) / (t(D tokens) - t(1 token)), greedy, end-of-sequence never stops it
  ttft_media_s    time to first token, prompt with one 280-token image and 10 s of audio (250 tokens)
                  (unigemma and transformers; llama.cpp runs the text model only)
  peak_rss_mib    peak resident memory of the measuring process
  batch1_decode_tok_s, batch8_decode_tok_s   (ours) aggregate decode tokens/s of 1 and 8 streams
                  of P/4-token prompts in the continuous-batching Scheduler, while all of them
                  decode; batch_ratio = batch8 / batch1

Our quantized configurations (`--ours-quant`, default int8 and int4-g32, bf16 activations, the
kernels quant/kernels.py picks on this CPU) run against llama.cpp's Q8_0 / Q4_0 of the same weights
(`--llama-quant`; Q4_0 made by llama.cpp's own quantizer), keys `ours_<quant>_<figure>` and
`ratio_<figure>_<quant>_vs_llama_<type>`; `--llama-site DIR` runs another llama.cpp build (e.g.
one without AVX-512, installed with `pip install --target DIR`).

Figures are best of --repeats. One JSON line on stdout, keys `<engine>_<dtype>_<figure>`
(engine: ours, transformers, llama; llama's dtype is the GGUF type: f32 for float32, bf16 for
bfloat16, plus --llama-quant e.g. q8_0), and ratios `ratio_<figure>_<dtype>_vs_<peer>` =
ours / peer (for tok/s above 1 means we are faster; for seconds below 1 means we are faster).

    python -m bench.generate_speed [--dtype float32,bfloat16] [--prompt-tokens 512]
        [--decode-tokens 64] [--threads 2] [--skip-llama] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.machine import machine
from bench.peers import best, media_prompt, rss_mib, run_child, run_peer, summarize, text_ids

GGUF_OF = {"float32": "f32", "bfloat16": "bf16"}


def measure_unigemma(path: str, dtype: str, P: int = 512, D: int = 64, threads: int = 2, repeats: int = 2,
                     media: bool = True, batch: int = 8, quant: str | None = None) -> dict:
    """Our engine (`unigemma.load`: the packed CPU fast path; Engine; Scheduler), in this process."""
    import torch

    torch.set_num_threads(threads)
    import unigemma
    from unigemma.generate.sampling import SamplingParams
    from unigemma.vocab import gemma4_vocab_gguf

    base = rss_mib()
    t = time.perf_counter()
    gemma = unigemma.load(path, dtype=dtype, tokenizer=gemma4_vocab_gguf(), quant=quant)
    load_s = time.perf_counter() - t
    engine = gemma.engine
    ids = torch.tensor([text_ids(P)])

    def gen(n, input_ids, **kw):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return engine.generate({"input_ids": input_ids, **kw}, params).token_ids

    gen(2, ids[:, :64])  # warm-up
    ttft, _ = best(lambda: gen(1, ids), repeats)
    total, toks = best(lambda: gen(D, ids), repeats)
    from unigemma.quant.kernels import describe

    out = dict(engine="unigemma", dtype=dtype, quant=quant, threads=threads, load_s=load_s,
               **summarize(P, D, ttft, total), tokens=toks[:16], distinct_tokens=len(set(toks)),
               kernels=describe(gemma.model))
    if media:
        mids, types, mm = media_prompt()
        out["media_prompt_tokens"] = mids.shape[1]
        out["ttft_media_s"], first = best(lambda: gen(1, mids, mm_token_type_ids=types, **mm), repeats)
        out["media_first_token"] = first[0]
    out.update(base_rss_mib=base, peak_rss_mib=rss_mib())
    if batch > 1:  # aggregate decode tokens/s of `batch` streams in the continuous batcher vs 1
        for n in (1, batch):
            out[f"batch{n}_decode_tok_s"] = max(scheduler_decode_rate(engine, n, P // 4, D) for _ in range(repeats))
        out["batch_ratio"] = out[f"batch{batch}_decode_tok_s"] / out["batch1_decode_tok_s"]
    return out


def scheduler_decode_rate(engine, n: int, P: int, D: int) -> float:
    """n requests of P-token prompts in the Scheduler: tokens/s of all rows decoding together,
    from the step after the last one joined to the step where the first one ends."""
    import torch

    from unigemma.generate.sampling import SamplingParams
    from unigemma.generate.scheduler import Scheduler

    s = Scheduler(engine, max_seqs=n, max_len=P + D + 1)
    params = SamplingParams(temperature=0.0, max_tokens=D, ignore_eos=True)
    for i in range(n):
        s.submit({"input_ids": torch.tensor([text_ids(P, seed=i + 1)])}, params)
    while len(s.running) < n:
        s.step()
    s.step()
    made, t = s.tokens_out, time.perf_counter()
    while len(s.running) == n:
        s.step()
    rate = (s.tokens_out - made) / (time.perf_counter() - t)
    s.run_until_done()
    return rate


FIGURES = ("ttft_text_s", "prefill_tok_s", "decode_tok_s", "ttft_media_s", "peak_rss_mib", "load_s", "distinct_tokens",
           "batch1_decode_tok_s", "batch8_decode_tok_s", "batch_ratio")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--no-media", action="store_true", help="skip the image + audio time to first token")
    ap.add_argument("--llama-quant", default="q8_0,q4_0", help="extra GGUF types for llama.cpp, comma-separated ('' for none)")
    ap.add_argument("--ours-quant", default="int8,int4-g32",
                    help="our quantized configurations (bf16 activations), each against llama.cpp's --llama-quant "
                         "of the same bits (int8 vs q8_0, int4-* vs q4_0)")
    ap.add_argument("--llama-site", metavar="DIR", help="run llama.cpp from this build (pip install --target DIR)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child-ours", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--child-quant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtypes = [d for d in a.dtype.split(",") if d]
    P, D, T, R = a.prompt_tokens, a.decode_tokens, a.threads, a.repeats

    if a.child_ours:  # one measurement of our engine, in a fresh process
        print(json.dumps(measure_unigemma(a.child_ours, dtypes[0], P, D, T, R, not a.no_media, quant=a.child_quant)))
        return

    from bench.checkpoint import make_checkpoint, to_gguf

    t0 = time.perf_counter()
    ckpt = make_checkpoint(hidden=a.hidden, layers=a.layers)
    common = ["--prompt-tokens", P, "--decode-tokens", D, "--threads", T, "--repeats", R]
    media = ["--no-media"] if a.no_media else []
    result = dict(bench="generate_speed", checkpoint=ckpt.name, prompt_tokens=P, decode_tokens=D, repeats=R,
                  llama_site=a.llama_site, **machine(T))
    raw = {}

    def record(name: str, out: dict):
        raw[name] = out
        if "error" in out:
            result[f"{name}_error"] = out["error"]
            print(f"[generate_speed] {name}: {out['error']}", file=sys.stderr)
            return
        for k in FIGURES + ("kernels",):
            if k in out:
                result[f"{name}_{k}"] = out[k]
        print(f"[generate_speed] {name}: {json.dumps(out)}", file=sys.stderr)

    for dtype in dtypes:
        if not a.skip_ours:
            record(f"ours_{dtype}", run_child("bench.generate_speed", ["--child-ours", ckpt, "--dtype", dtype, *common, *media]))
        if not a.skip_transformers:
            record(f"transformers_{dtype}", run_peer("transformers", "--ckpt", ckpt, "--dtype", dtype, *common, *media))
    ours_quants = [q for q in a.ours_quant.split(",") if q]
    if not a.skip_ours:
        for q in ours_quants:
            record(f"ours_{q}", run_child("bench.generate_speed", ["--child-ours", ckpt, "--dtype", "bfloat16",
                                                                   "--child-quant", q, *common, "--no-media"]))
    if not a.skip_llama:
        from bench.full_12b import llama_q4_0

        env = None if not a.llama_site else dict(os.environ, PYTHONPATH=a.llama_site)
        quants = [GGUF_OF[d] for d in dtypes] + [q for q in a.llama_quant.split(",") if q]
        for q in dict.fromkeys(quants):
            try:
                gguf = llama_q4_0(to_gguf(ckpt, "q8_0")) if q == "q4_0" else to_gguf(ckpt, q)
            except Exception as e:  # noqa: BLE001 - report, measure the others
                record(f"llama_{q}", {"error": f"conversion failed: {e}"})
                continue
            record(f"llama_{q}", run_child("bench.peers", ["llama", "--gguf", gguf, *common], env=env))

    for dtype in dtypes:
        ours = raw.get(f"ours_{dtype}", {})
        peers = {"transformers": raw.get(f"transformers_{dtype}", {}), "llama": raw.get(f"llama_{GGUF_OF[dtype]}", {})}
        for peer, theirs in peers.items():
            for k in ("ttft_text_s", "decode_tok_s", "ttft_media_s", "peak_rss_mib"):
                if k in ours and k in theirs:
                    result[f"ratio_{k}_{dtype}_vs_{peer}"] = ours[k] / theirs[k]
            if "tokens" in ours and "tokens" in theirs:  # greedy agreement: leading tokens in common (of 16)
                n = next((i for i, (x, y) in enumerate(zip(ours["tokens"], theirs["tokens"])) if x != y),
                         min(len(ours["tokens"]), len(theirs["tokens"])))
                result[f"same_first_tokens_{dtype}_vs_{peer}"] = n
    for q in ours_quants:  # our int8 / int4 against llama.cpp's Q8_0 / Q4_0
        theirs = raw.get("llama_" + ("q8_0" if q.startswith("int8") else "q4_0"), {})
        ours = raw.get(f"ours_{q}", {})
        for k in ("decode_tok_s", "prefill_tok_s"):
            if k in ours and k in theirs:
                result[f"ratio_{k}_{q}_vs_llama_{'q8_0' if q.startswith('int8') else 'q4_0'}"] = ours[k] / theirs[k]
    for q in [q for q in a.llama_quant.split(",") if q]:  # quantized llama.cpp vs our best dtype
        theirs = raw.get(f"llama_{q}", {})
        for dtype in dtypes:
            ours = raw.get(f"ours_{dtype}", {})
            if "decode_tok_s" in ours and "decode_tok_s" in theirs:
                result[f"ratio_decode_tok_s_{dtype}_vs_llama_{q}"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
