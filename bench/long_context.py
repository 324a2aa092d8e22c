"""Long context: decode speed with 1K-128K tokens in the cache, prefill speed at 1K-8K, peak RSS.

Prefilling 128K tokens on two cores takes hours (the 12B) or most of an hour (the mid-size
model), and a decode step's cost depends on what the cache holds, not on how it got there. So
for the decode figures the cache is filled with synthetic K/V: random values written into every
buffer of `cache.layers[i]` (bf16 K/V ~ N(0, 1) as the q/k/v norms leave them; int8 codes and
their scales where the cache stores int8) and the slot bookkeeping set as a real prefill leaves
it (token i in slot i % capacity, the rings holding the newest tokens). Then greedy steps run
through the model's own forward and head, round-robin over the contexts' caches (held
together, so a shared machine's load changes weigh on every context alike); tok/s is over the
faster half of each context's steps (that noise is one-sided).

Prefill is real: `Engine.prefill_steps` (chunked, chunks shrinking past the engine's score
budget) over random ordinary-text ids, tokens/s per prompt length. On the 12B a 1K-8K prompt
would take 5-30 minutes, so there it is one 512-token chunk appended to 512 and to 7,680
synthetic tokens (prefill speed at 1K and 8K of context).

Models: (a) the mid-size random checkpoint (bench/checkpoint.py, bf16 weights), (b) the exact
12B shape (bench/full_12b.py's random checkpoint) with int4-g128 weights, in a fresh process
each (the 12B at 1K and 128K only: both caches fit beside its weights); the KV cache in bf16, and in int8 (full layers only, and all layers) where this tree's
cache has int8 storage (cache/kv.py `kv_dtype`), else says so. Peak RSS (VmHWM) is per process,
load included; the 12B's target: <= 14 GiB with 128K tokens in the cache.

    python -m bench.long_context [--models mid,12b] [--contexts 1024,8192,32768,131072]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.machine import machine
from bench.peers import rss_mib, run_child, text_ids

REPO = Path(__file__).resolve().parent.parent
FILL_ROWS = 8192  # slots of float32 noise drawn at a time: bounded scratch memory


def fill(cache, n: int, seed: int = 0) -> None:
    """Make `cache` (a one-sequence KVCache) look as if `n` tokens had been prefilled."""
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(cache.config.layer_types):
        held = min(n, cache.capacity[t])
        for buf in cache.layers[i]:  # (k, v) or (k codes, v codes, k scales, v scales): generic
            for a in range(0, held, FILL_ROWS):
                view = buf[:, :, a:min(held, a + FILL_ROWS)]
                if buf.dtype == torch.int8:
                    view.copy_(torch.randint(-127, 128, view.shape, generator=g, dtype=torch.int8))
                elif buf.shape[-1] == 1:  # int8 scales: max |N(0,1)| over a head (~3) / 127
                    view.copy_(torch.rand(view.shape, generator=g) * 0.01 + 0.02)
                else:
                    view.copy_(torch.randn(view.shape, generator=g).to(buf.dtype))
    cache.length = n
    cache.valid[:, :n] = True
    for t, cap in cache.capacity.items():
        idx = torch.arange(max(0, n - cap), n)  # the newest `cap` tokens, token i in slot i % cap
        cache.slot_idx[t].fill_(-1)
        cache.slot_idx[t][idx % cap] = idx


def kv_kwargs(kv: str) -> dict | None:
    """make_cache's keyword arguments for a KV choice ('bf16', 'int8-full', 'int8-all'); None
    when this tree's cache has no int8 storage."""
    if kv == "bf16":
        return {}
    from unigemma.cache.kv import KVCache

    if "kv_dtype" not in inspect.signature(KVCache).parameters:
        return None
    return dict(kv_dtype="int8", quant_layers=kv.split("-")[1])


def cache_bytes(cache) -> int:
    return sum(b.numel() * b.element_size() for layer in cache.layers for b in layer)


def decode(model, caches: dict, steps: int) -> dict:
    """Greedy steps on each cache as it stands, round-robin (a shared machine's load changes
    then weigh on every context alike); per cache, tokens/s over the faster half after the
    first step."""
    tok = {n: torch.tensor([1000]) for n in caches}
    times = {n: [] for n in caches}
    for _ in range(steps):
        for n, cache in caches.items():
            t = time.perf_counter()
            h = model(tok[n][:, None], cache.positions[:, None], cache=cache, require_media=False)[:, -1]
            tok[n] = model.head(h).argmax(-1)
            times[n].append(time.perf_counter() - t)
    out = {}
    for n, ts in times.items():
        fast = sorted(ts[1:])[: max(1, (len(ts) - 1) // 2)]
        out[n] = len(fast) / sum(fast)
    return out


def engine_for(model, kv: dict):
    from unigemma.generate.engine import Engine

    # The prefill needs no text: only the ids that would end a reply (none are decoded here).
    tokenizer = SimpleNamespace(eos_ids=[1])
    if kv:
        return Engine(model, tokenizer, kv_cache_dtype=kv["kv_dtype"], kv_quant_layers=kv["quant_layers"])
    return Engine(model, tokenizer)


def prefill_real(model, kv: dict, n: int) -> float:
    """Tokens/s of a real chunked prefill of an n-token prompt."""
    from unigemma.generate.sampling import SamplingParams

    engine = engine_for(model, kv)
    ids = torch.tensor([text_ids(n)])
    t = time.perf_counter()
    engine.prefill({"input_ids": ids}, [SamplingParams(max_tokens=1)])
    return n / (time.perf_counter() - t)


def prefill_chunk_at(model, kv: dict, context: int, chunk: int = 512) -> float:
    """Tokens/s of one `chunk`-token forward appended to `context - chunk` synthetic tokens."""
    cache = model.make_cache(1, context, **kv)
    fill(cache, context - chunk)
    ids = torch.tensor([text_ids(chunk, seed=1)])
    t = time.perf_counter()
    model(ids, cache.positions[:, None] + torch.arange(chunk)[None], cache=cache)
    return chunk / (time.perf_counter() - t)


def measure(ckpt: str, quant: str | None, kvs: list[str], contexts: list[int], prefills: list[int],
            chunk_prefill: bool, steps: int, threads: int, prefill_repeats: int) -> dict:
    torch.set_num_threads(threads)
    import unigemma

    t = time.perf_counter()
    model = unigemma.load_model(ckpt, dtype="bfloat16", quant=quant)
    out = dict(quant=quant or "bf16", load_s=round(time.perf_counter() - t, 1), rss_after_load_mib=round(rss_mib()))
    kvs = {name: kv_kwargs(name) for name in kvs}
    for name in [n for n, kv in kvs.items() if kv is None]:
        out[f"kv_{name}"] = "not measured: this tree's KV cache has no int8 storage (cache/kv.py kv_dtype)"
        del kvs[name]
    with torch.inference_mode():
        caches = {}
        for name, kv in kvs.items():  # every (KV choice, context) held at once, decoded round-robin
            for n in contexts:
                caches[(name, n)] = cache = model.make_cache(1, n + steps + 8, **kv)
                fill(cache, n)
                out[f"kv_{name}_cache_mib_{n}"] = round(cache_bytes(cache) / 2**20, 1)
        out["peak_rss_mib_with_all_caches"] = round(rss_mib())
        for (name, n), tok_s in decode(model, caches, steps).items():
            out[f"kv_{name}_decode_tok_s_{n}"] = round(tok_s, 3)
        del caches, cache
        best = {}
        for _ in range(prefill_repeats):  # interleaved, best of: load changes hit every case
            for name, kv in kvs.items():
                for n in prefills:
                    tok_s = (prefill_chunk_at if chunk_prefill else prefill_real)(model, kv, n)
                    best[(name, n)] = max(best.get((name, n), 0.0), tok_s)
        out.update({f"kv_{name}_prefill_tok_s_{n}": round(v, 2) for (name, n), v in best.items()})
    lo, hi = min(contexts), max(contexts)
    for name in kvs:
        out[f"kv_{name}_decode_ratio_{hi}_vs_{lo}"] = round(
            out[f"kv_{name}_decode_tok_s_{hi}"] / out[f"kv_{name}_decode_tok_s_{lo}"], 3)
        if name != "bf16" and "bf16" in kvs:
            out[f"kv_{name}_vs_bf16_decode_{hi}"] = round(
                out[f"kv_{name}_decode_tok_s_{hi}"] / out[f"kv_bf16_decode_tok_s_{hi}"], 3)
    out["peak_rss_mib"] = round(rss_mib())
    out["peak_rss_gib"] = round(rss_mib() / 1024, 2)
    return out


def mid_checkpoint(root: str | None) -> Path:
    from bench.checkpoint import make_checkpoint

    return make_checkpoint(root)


def big_checkpoint(path: str | None) -> Path:
    if path:
        return Path(path)
    from bench.full_12b import write_checkpoint

    return write_checkpoint()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mid,12b")
    ap.add_argument("--kv", default="bf16,int8-full,int8-all", help="KV choices (int8 where the cache has it)")
    ap.add_argument("--contexts", default="1024,8192,32768,131072")
    ap.add_argument("--prefills", default="1024,2048,4096,8192", help="mid-size: real prompts of these lengths")
    ap.add_argument("--big-prefills", default="1024,8192", help="12B: a 512-token chunk at these contexts")
    ap.add_argument("--big-kv", default="int8-full", help="the 12B's KV choices (one process, loaded once)")
    ap.add_argument("--big-contexts", default="1024,131072", help="the 12B's (its caches are held together)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mid-root", help="where the mid-size checkpoint is (bench/checkpoint.py's runs/bench)")
    ap.add_argument("--big-ckpt", help="the random 12B checkpoint directory (default: bench/full_12b.py's)")
    ap.add_argument("--child", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-prefill", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if a.child:
        print(json.dumps(measure(a.child, a.quant, a.kv.split(","), ints(a.contexts), ints(a.prefills),
                                 a.chunk_prefill, a.steps, a.threads, a.prefill_repeats)))
        return
    t0 = time.perf_counter()
    result = dict(bench="long_context", contexts=ints(a.contexts), big_contexts=ints(a.big_contexts), decode_steps=a.steps,
                  fill="synthetic K/V, bookkeeping as a prefill leaves it", **machine(a.threads))
    for name in [m for m in a.models.split(",") if m]:
        if name == "mid":
            ckpt, args = mid_checkpoint(a.mid_root), ["--kv", a.kv, "--prefills", a.prefills]
        elif name == "12b":
            ckpt = big_checkpoint(a.big_ckpt)
            args = ["--quant", "int4-g128", "--kv", a.big_kv, "--prefills", a.big_prefills, "--chunk-prefill",
                    "--prefill-repeats", 1, "--contexts", a.big_contexts]
        else:
            raise SystemExit(f"unknown model {name!r} (mid, 12b)")
        args = ["--contexts", a.contexts, "--prefill-repeats", a.prefill_repeats, *args]  # later flags win
        out = run_child("bench.long_context", ["--child", ckpt, "--steps", a.steps, "--threads", a.threads, *args],
                        timeout=7200)
        result.update({f"{name}_{k}": v for k, v in out.items()})
        result[f"{name}_checkpoint"] = ckpt.name
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
