"""Time the peers (transformers, llama.cpp) on the benchmark checkpoint, one process per measurement.

Each measurement runs as `python -m bench.peers <peer> ...` in its own process, so peak RSS figures
do not mix, and prints one JSON line (the last stdout line). `run_peer()` spawns it and parses it.

Figures, batch 1, greedy, N threads:
  ttft_text_s     time to the first new token of a P-token random text prompt (best of --repeats);
                  prefill_tok_s = P / ttft_text_s
  decode_tok_s    (D - 1) / (t(D tokens) - t(1 token)): generation of D tokens with end-of-sequence
                  never stopping it (best of --repeats for each of the two times)
  ttft_media_s    (transformers) time to the first token of a prompt with one 280-token image and
                  10 s of audio (250 tokens), processor-shaped tensors
  peak_rss_mib    peak resident memory of the whole process; base_rss_mib before the model is loaded

    python -m bench.peers transformers --ckpt DIR --dtype bfloat16
    python -m bench.peers llama --gguf FILE
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REAL = dict(bos=2, boi=255999, image=258880, eoi=258882, boa=256000, audio=258881, eoa=258883)
IMAGE_GRID = (14, 20)  # 280 soft tokens: the 12B's default image budget
AUDIO_TOKENS = 250  # 10 s at 640 samples (40 ms) per token


def rss_mib() -> float:
    """Peak resident memory of this process so far. VmHWM belongs to the process's own memory
    map; ru_maxrss is kept across exec on Linux, so a child would report its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_ids(n: int, seed: int = 0) -> list[int]:
    """<bos> + n-1 random ordinary-text token ids (same list for every peer)."""
    rnd = random.Random(seed)
    return [REAL["bos"]] + [rnd.randrange(1000, 250000) for _ in range(n - 1)]


def media_prompt(seed: int = 0, text: int = 16):
    """ids, mm_token_type_ids and processor-shaped media tensors: text, one image, 10 s of audio, text."""
    import torch

    rnd = random.Random(seed + 1)
    words = lambda: [rnd.randrange(1000, 250000) for _ in range(text)]  # noqa: E731
    n_img = IMAGE_GRID[0] * IMAGE_GRID[1]
    ids = [REAL["bos"]] + words() + [REAL["boi"]] + [REAL["image"]] * n_img + [REAL["eoi"]]
    ids += [REAL["boa"]] + [REAL["audio"]] * AUDIO_TOKENS + [REAL["eoa"]] + words()
    types = [1 if t == REAL["image"] else 3 if t == REAL["audio"] else 0 for t in ids]
    g = torch.Generator().manual_seed(seed)
    rows, cols = IMAGE_GRID
    pixel_values = torch.rand(1, n_img, 6912, generator=g)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    image_position_ids = torch.stack([xs.flatten(), ys.flatten()], -1)[None]
    input_features = torch.randn(1, AUDIO_TOKENS, 640, generator=g) * 0.3
    input_features_mask = torch.ones(1, AUDIO_TOKENS, dtype=torch.bool)
    media = dict(pixel_values=pixel_values, image_position_ids=image_position_ids, input_features=input_features,
                 input_features_mask=input_features_mask)
    return torch.tensor([ids]), torch.tensor([types]), media


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def summarize(P: int, D: int, ttft: float, total: float) -> dict:
    return dict(ttft_text_s=ttft, prefill_tok_s=P / ttft, decode_total_s=total,
                decode_tok_s=(D - 1) / max(total - ttft, 1e-9))


# --------------------------------------------------------------------------------------- transformers

def measure_transformers(ckpt: str, dtype: str, P: int, D: int, threads: int, repeats: int, media: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers

    base = rss_mib()
    t = time.perf_counter()
    model = transformers.Gemma4UnifiedForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t
    ids = torch.tensor([text_ids(P)])

    def gen(n, input_ids, **kw):
        with torch.inference_mode():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, **kw)[0, input_ids.shape[1]:].tolist()

    gen(2, ids[:, :64])  # warm-up
    ttft, _ = best(lambda: gen(1, ids), repeats)
    total, toks = best(lambda: gen(D, ids), repeats)
    out = dict(peer="transformers", dtype=dtype, threads=threads, load_s=load_s, **summarize(P, D, ttft, total),
               tokens=toks[:16], distinct_tokens=len(set(toks)))
    if media:
        mids, types, mm = media_prompt()
        out["media_prompt_tokens"] = mids.shape[1]
        mm = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in mm.items()}
        out["ttft_media_s"], first = best(lambda: gen(1, mids, mm_token_type_ids=types, **mm), repeats)
        out["media_first_token"] = first[0]
    out.update(base_rss_mib=base, peak_rss_mib=rss_mib())
    return out


# ------------------------------------------------------------------------------------------ llama.cpp

def measure_llama(gguf: str, P: int, D: int, threads: int, repeats: int, n_ctx: int = 2048) -> dict:
    import numpy as np
    from llama_cpp import Llama

    base = rss_mib()
    t = time.perf_counter()
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                n_ubatch=512, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()
    ids = text_ids(P)

    def argmax() -> int:  # greedy on the last position's logits: no sampler, no stop on end-of-sequence
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    def gen(n, prompt):
        llm.reset()
        llm.eval(prompt)
        toks = [argmax()]
        while len(toks) < n:
            llm.eval([toks[-1]])
            toks.append(argmax())
        return toks

    gen(2, ids[:64])  # warm-up
    ttft, _ = best(lambda: gen(1, ids), repeats)
    total, toks = best(lambda: gen(D, ids), repeats)
    return dict(peer="llama.cpp", gguf=Path(gguf).name, threads=threads, load_s=load_s, **summarize(P, D, ttft, total),
                tokens=toks[:16], distinct_tokens=len(set(toks)), base_rss_mib=base, peak_rss_mib=rss_mib())


# ---------------------------------------------------------------------------------------- subprocesses

def run_child(module: str, args: list[str], timeout: float = 900, env: dict | None = None) -> dict:
    """`python -m module args...` in a fresh process; its last stdout line as JSON (error dict on failure)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=Path(__file__).resolve().parent.parent, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


def run_peer(peer: str, *args) -> dict:
    return run_child("bench.peers", [peer, *args])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["transformers", "llama"])
    ap.add_argument("--ckpt")
    ap.add_argument("--gguf")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-media", action="store_true")
    a = ap.parse_args()
    if a.peer == "transformers":
        out = measure_transformers(a.ckpt, a.dtype, a.prompt_tokens, a.decode_tokens, a.threads, a.repeats,
                                   not a.no_media)
    else:
        out = measure_llama(a.gguf, a.prompt_tokens, a.decode_tokens, a.threads, a.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
