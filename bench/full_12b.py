"""The full 12B shape on this machine: int8 and int4 memory and decode speed, against the memory
roofline and llama.cpp on the same weights.

1. Writes (once) a random checkpoint with the exact 12B config (`../shared/configs/gemma-4-12B`)
   in bf16 safetensors shards, streamed tensor by tensor (about 22 GiB on disk).
2. For each quantization, in a fresh process: loads it (each weight quantized as it streams in),
   allocates the KV cache for a `--context`-token conversation, prefills a `--prompt-tokens`
   prompt and decodes `--decode-tokens` greedy tokens. Peak RSS covers all of it.
3. Roofline: read bandwidth measured here (2 GiB int16 max, best of 5, same threads) ÷ bytes
   read per decoded token (the codes and the scales the kernels read, the 8-bit head included).
4. llama.cpp (bench extra) on the same weights: the converter's Q8_0, and Q4_0 quantized from it
   with llama.cpp's own quantizer (`llama_model_quantize`); decode tokens/s, same threads.

One JSON line. `--layers N` writes a shallower model of the same widths (a quick check).

    python -m bench.full_12b [--quants int8,int4-g128] [--llama q8_0,q4_0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.peers import rss_mib, run_child, text_ids

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO.parent / "shared" / "configs" / "gemma-4-12B" / "config.json"
SHARD_BYTES = 4 << 30


def write_checkpoint(layers: int | None = None, seed: int = 0) -> Path:
    """The random 12B checkpoint (unigemma's one writer, tensor by tensor into 4 GiB shards)."""
    from unigemma.weights.random import write_random_checkpoint

    cfg = json.loads(CONFIG.read_text())
    if layers:
        t = cfg["text_config"]
        t["layer_types"] = t["layer_types"][-layers:]
        t["num_hidden_layers"] = layers
    root = REPO / "runs" / "bench" / f"full12b-L{cfg['text_config']['num_hidden_layers']}"
    if (root / "model.safetensors.index.json").exists():
        return root
    return write_random_checkpoint(cfg, root, seed=seed, dtype=torch.bfloat16, shard_bytes=SHARD_BYTES)


def bytes_per_token(model) -> int:
    """What a decode step reads: every decoder matrix's codes and the scales its kernel reads,
    the tied 8-bit head; float matrices at their size."""
    from unigemma.quant.linear import QuantLinear

    total = 0
    for name, m in model.named_modules():
        if "embed_vision" in name or "embed_audio" in name:
            continue
        if isinstance(m, QuantLinear):  # torch's kernels read their own scale tables
            scales = m._scales_for(torch.bfloat16) if m.path in ("int8pack", "int4pack") else m.scales
            total += m.weight.numel() * m.weight.element_size() + scales.numel() * scales.element_size()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def measure(ckpt: str, quant: str, context: int, P: int, D: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    import unigemma
    from unigemma.quant.kernels import describe

    base = rss_mib()
    t = time.perf_counter()
    model = unigemma.load_model(ckpt, dtype="bfloat16", quant=quant)
    load_s, after_load = time.perf_counter() - t, rss_mib()
    ids = torch.tensor([text_ids(P)])
    with torch.inference_mode():
        cache = model.make_cache(1, context)
        t = time.perf_counter()
        h = model(ids, torch.arange(P)[None], cache=cache)[:, -1]
        prefill_s = time.perf_counter() - t
        tok, times, out = model.head(h).argmax(-1), [], []
        for _ in range(D):
            t = time.perf_counter()
            h = model(tok[:, None], cache.positions[:, None], cache=cache, require_media=False)[:, -1]
            tok = model.head(h).argmax(-1)
            times.append(time.perf_counter() - t)
            out.append(int(tok))
    steady = sorted(times[1:])[: max(1, len(times) // 2)]  # the faster half: noise on a shared machine
    return dict(quant=quant, load_s=load_s, base_rss_mib=base, rss_after_load_mib=after_load, peak_rss_mib=rss_mib(),
                context=context, prefill_s=prefill_s, decode_tok_s=len(steady) / sum(steady),
                decode_tok_s_mean=len(times) / sum(times), bytes_per_token=bytes_per_token(model), tokens=out[:8],
                kernels=describe(model))


def llama_q4_0(q8: Path) -> Path:
    """Q4_0 from the Q8_0 file with llama.cpp's own quantizer (requantizing: fine for speed)."""
    out = q8.with_name("text-q4_0.gguf")
    if out.exists():
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(q8).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError("llama_model_quantize failed")
    tmp.rename(out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, help="fewer layers, same widths (default: all 48)")
    ap.add_argument("--quants", default="int8,int4-g128")
    ap.add_argument("--llama", default="q8_0,q4_0", help="llama.cpp GGUF types ('' for none)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-site", metavar="DIR", help="run llama.cpp from this build (pip install --target DIR)")
    ap.add_argument("--child", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.quant, a.context, a.prompt_tokens, a.decode_tokens, a.threads)))
        return
    t0 = time.perf_counter()
    ckpt = write_checkpoint(a.layers)
    result = dict(bench="full_12b", checkpoint=ckpt.name, context=a.context, write_s=time.perf_counter() - t0,
                  llama_site=a.llama_site, **machine(a.threads, bandwidth_gib=2))
    for q in [q for q in a.quants.split(",") if q]:
        out = run_child("bench.full_12b", ["--child", ckpt, "--quant", q, "--context", a.context, "--prompt-tokens",
                                           a.prompt_tokens, "--decode-tokens", a.decode_tokens, "--threads", a.threads],
                        timeout=3600)
        if "error" in out:
            result[f"ours_{q}_error"] = out["error"]
            continue
        roof = result["read_bandwidth_gb_s"] * 1e9 / out["bytes_per_token"]
        result.update({f"ours_{q}_{k}": v for k, v in out.items() if k not in ("quant", "tokens")})
        result[f"ours_{q}_roofline_tok_s"] = roof
        result[f"ours_{q}_roofline_fraction"] = out["decode_tok_s"] / roof
    from bench.checkpoint import to_gguf

    for q in [q for q in a.llama.split(",") if q]:
        try:
            gguf = to_gguf(ckpt, "q8_0") if q == "q8_0" else llama_q4_0(to_gguf(ckpt, "q8_0"))
        except Exception as e:  # noqa: BLE001 - report, measure the others
            result[f"llama_{q}_error"] = str(e)[-500:]
            continue
        env = None if not a.llama_site else dict(os.environ, PYTHONPATH=a.llama_site)
        out = run_child("bench.peers", ["llama", "--gguf", gguf, "--prompt-tokens", a.prompt_tokens, "--decode-tokens",
                                        a.decode_tokens, "--threads", a.threads, "--repeats", 1], timeout=3600, env=env)
        result.update({f"llama_{q}_{k}": v for k, v in out.items() if k in ("decode_tok_s", "peak_rss_mib", "error")})
    for ours, theirs in (("int8", "q8_0"), ("int4-g32", "q4_0"), ("int4-g128", "q4_0")):
        if f"ours_{ours}_decode_tok_s" in result and f"llama_{theirs}_decode_tok_s" in result:
            result[f"ratio_{ours}_vs_llama_{theirs}"] = (result[f"ours_{ours}_decode_tok_s"]
                                                         / result[f"llama_{theirs}_decode_tok_s"])
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
