"""int8 KV cache quality and decode speed on real weights: Gemma 3 270M (the demo's Q4_K_M GGUF).

For each long prompt of real English text, the bf16 cache's run is the baseline: the prompt is
prefilled in 512-token chunks up to its last `--positions` tokens, which then run in 16-token
steps (the decode / verify read path, models/attention.py `decode_attention_int8` for int8),
their next-token logits kept. The same runs with the int8 cache on the full layers, the sliding
layers, or all of them (run in lockstep with it) give per position KL(bf16 cache || int8 cache)
and top-1 agreement, from fp32 logits of the float (dequantized) weights
(targets: mean KL <= 0.002, top-1 >= 99%), beside the same figures for a bf16 cache whose
prompt was prefilled in half-size chunks (`floor_*`: bf16 inference's own rounding noise). Then, at the longest prompt's length, one-token
decode steps are timed with each cache (best of `--repeats` rounds of `--steps` steps), the bf16
cache both as served (SDPA: Gemma 3's kernel) and through the matmul kernel int8 decode uses.

The text: the GNU/Apache/Mozilla/Artistic/CC0 licence texts of /usr/share/common-licenses (Debian
base-files), concatenated in a fixed order (`TEXTS`); legal English prose, and some of it near-
copies of earlier parts (GPL-2 after GPL-3, LGPL-3 after LGPL-2.1), which long-range recall
over the cache must get right. One JSON line per choice of quantized layers (full / sliding /
all), each with bench/machine.py's machine info.

    python -m bench.kv_quality [--lengths 8192,16384] [--positions 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.machine import machine

LICENSES = Path("/usr/share/common-licenses")
TEXTS = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0", "GPL-2", "MPL-1.1",
         "GPL-1", "LGPL-2", "BSD", "LGPL-3", "GFDL-1.2"]
CHOICES = ["full", "sliding", "all"]
PREFILL_CHUNK, STEP = 512, 16  # STEP <= attention.DECODE_QUERIES: the last positions take the decode path
RESERVE = 64  # ring slots past the window: the timed decode steps roll back this much at most


def text_ids(tokenizer, n: int) -> list[int]:
    text = "\n\n".join((LICENSES / name).read_text() for name in TEXTS if (LICENSES / name).is_file())
    ids = tokenizer.encode(text)
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of licence text in {LICENSES}; ask for shorter prompts")
    return ids[:n]


@torch.inference_mode()
def compare(model, ids: list[int], positions: int):
    """Every cache choice over one prompt, in lockstep (the logits of 1,000 positions over a
    262K vocabulary are 1 GB: each step's are compared, then dropped). Returns the caches and
    per choice KL(bf16 cache || choice) per position and top-1 agreement. The "floor" choice is
    the bf16 cache again with the prompt prefilled in half-size chunks: bf16 inference's own
    rounding noise, what the int8 figures are to be read against."""
    n, first = len(ids), len(ids) - positions
    kvs = {"bf16": {}, "floor": {}, **{c: dict(kv_dtype="int8", quant_layers=c) for c in CHOICES}}
    caches = {c: model.make_cache(1, n + RESERVE, reserve=RESERVE, **kv) for c, kv in kvs.items()}
    w = model.head_weight().float()  # fp32 logits: bf16 ones tie at the top (steps of 1/8 at 20)
    cap = model.config.text.final_logit_softcapping
    x = torch.tensor([ids])
    starts = [*range(0, first, PREFILL_CHUNK), *range(first, n, STEP)]
    kl, agree, margin = {c: [] for c in kvs if c != "bf16"}, {c: [] for c in kvs if c != "bf16"}, []
    for a, b in zip(starts, starts[1:] + [n]):
        b = min(b, first) if a < first else b
        hs = {}
        for c, cache in caches.items():
            if c == "floor" and a < first and b - a > 1:
                mid = (a + b) // 2
                model(x[:, a:mid], torch.arange(a, mid)[None], cache=cache)
                hs[c] = model(x[:, mid:b], torch.arange(mid, b)[None], cache=cache)
            else:
                hs[c] = model(x[:, a:b], torch.arange(a, b)[None], cache=cache)
        if a < first:
            continue
        lp = {}
        for c, h in hs.items():
            logits = h[0].float() @ w.T
            lp[c] = (torch.tanh(logits / cap) * cap if cap else logits).log_softmax(-1)
        ref = lp.pop("bf16")
        top2 = ref.topk(2, -1).values
        margin.append(top2[:, 0] - top2[:, 1])
        for c, got in lp.items():
            kl[c].append((ref.exp() * (ref - got)).sum(-1))
            agree[c].append(got.argmax(-1) == ref.argmax(-1))
    figures = {c: dict(kl=torch.cat(kl[c]), top1=torch.cat(agree[c]).float().mean()) for c in kl}
    return caches, figures, torch.cat(margin).median()


@torch.inference_mode()
def prefill(model, ids: list[int], **kv):
    """A cache holding `ids`, prefilled in PREFILL_CHUNK-token chunks."""
    cache = model.make_cache(1, len(ids) + RESERVE, reserve=RESERVE, **kv)
    x = torch.tensor([ids])
    for a in range(0, len(ids), PREFILL_CHUNK):
        b = min(len(ids), a + PREFILL_CHUNK)
        model(x[:, a:b], torch.arange(a, b)[None], cache=cache)
    return cache


@contextmanager
def matmul_decode(on: bool):
    """Gemma 3 attends through SDPA at every size (models/gemma3.py: parity with the references);
    an int8 cache's decode steps take the matmul kernel (decode_attention_int8). With `on`, the
    float cache's steps take the matmul kernel too (`decode_attention`), so the two caches are
    timed through the same kind of kernel."""
    from unigemma.models import attention, gemma3

    plain = gemma3.attend
    if on:
        gemma3.attend = lambda *args, **kw: attention.attend(*args, **{**kw, "use_decode_kernel": True})
    try:
        yield
    finally:
        gemma3.attend = plain


@torch.inference_mode()
def decode_tok_s(model, caches: dict, steps: int, repeats: int) -> dict:
    """One-token steps on each cache (all `cache.length` long), rounds interleaved across the
    caches (a busy machine slows them alike), best of `repeats`, each round rolled back.
    "bf16" is timed twice: as served (SDPA) and through the matmul kernel ("bf16_matmul")."""
    runs = {**{c: (cache, False) for c, cache in caches.items()}, "bf16_matmul": (caches["bf16"], True)}
    best = {c: float("inf") for c in runs}
    tok = torch.tensor([[5]])
    for _ in range(repeats):
        for c, (cache, matmul) in runs.items():
            start = cache.length
            with matmul_decode(matmul):
                t = time.perf_counter()
                for j in range(steps):
                    model(tok, torch.tensor([[start + j]]), cache=cache)
                best[c] = min(best[c], time.perf_counter() - t)
            cache.trim(steps)
    return {c: steps / t for c, t in best.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="8192,16384", help="prompt lengths in tokens (Gemma 3 270M: up to 32768)")
    ap.add_argument("--positions", type=int, default=1000, help="last positions compared per prompt")
    ap.add_argument("--steps", type=int, default=32, help=f"decode steps per timing round (at most {RESERVE})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-only", action="store_true", help="only the decode timing, at the longest length")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import unigemma
    from bench.demo_speed import demo_gguf
    from unigemma.quant.kernels import describe

    # float weights (dequantize): int8-activation kernels would round activations per row,
    # turning tiny attention differences into code flips that are the kernels' noise, not the cache's
    gemma = unigemma.load(demo_gguf(), dtype="bfloat16", dequantize=True)
    model = gemma.model
    lengths = [int(n) for n in a.lengths.split(",")]
    ids = text_ids(gemma.tokenizer, max(lengths))
    if model.head_weight() is None:
        raise SystemExit("the head is quantized: this benchmark computes fp32 logits from a float head")
    info = machine(a.threads)
    results = {c: dict(bench="kv_quality", model="gemma-3-270m Q4_K_M GGUF", quant_layers=c, kv_cache_dtype="int8",
                       text=f"{LICENSES} ({', '.join(TEXTS)})", positions=a.positions, lengths=lengths,
                       kernels=describe(model), **info) for c in CHOICES}
    for n in lengths if not a.decode_only else []:
        caches, figures, margin = compare(model, ids[:n], a.positions)
        for c in CHOICES:
            r = results[c]
            for name, f in (("", figures[c]), ("floor_", figures["floor"])):
                r[f"{name}kl_mean_{n}"] = float(f["kl"].mean())
                r[f"{name}kl_p99_{n}"] = float(f["kl"].quantile(0.99))
                r[f"{name}top1_agreement_{n}"] = float(f["top1"])
            r[f"bf16_median_top1_logprob_margin_{n}"] = float(margin)
        del caches
    n = max(lengths)
    caches = {"bf16": prefill(model, ids[:n]), **{c: prefill(model, ids[:n], kv_dtype="int8", quant_layers=c)
                                                  for c in CHOICES}}
    speed = decode_tok_s(model, caches, a.steps, a.repeats)
    del caches
    from unigemma.cache.batch import bytes_per_row

    t = model.config.text
    for c in CHOICES:
        r = results[c]
        r["decode_context"], r["decode_tok_s"] = n, speed[c]
        r["bf16_decode_tok_s"], r["bf16_matmul_decode_tok_s"] = speed["bf16"], speed["bf16_matmul"]
        r["decode_speed_ratio"] = speed[c] / speed["bf16"]  # against bf16 as served (SDPA on Gemma 3)
        r["decode_speed_ratio_same_kernel"] = speed[c] / speed["bf16_matmul"]
        r["kv_bytes"] = bytes_per_row(t, n, model.dtype, kv_dtype="int8", quant_layers=c)
        r["bf16_kv_bytes"] = bytes_per_row(t, n, model.dtype)
        r["kv_bytes_ratio"] = r["kv_bytes"] / r["bf16_kv_bytes"]
        if not a.decode_only:
            r["meets_targets"] = all(r[f"kl_mean_{m}"] <= 0.002 and r[f"top1_agreement_{m}"] >= 0.99
                                     for m in lengths)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
