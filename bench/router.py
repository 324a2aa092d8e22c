"""Replicas behind SGLang's router: the router's added latency, and cache-aware vs round-robin routing.

Starts 2 `unigemma serve` replicas and the router as processes on loopback (bench/replicas.py;
the demo checkpoint unless --model), twice: once per policy, so each policy's replicas start
with empty prefix caches.

- Added latency (round-robin run): the same small request (`--latency-tokens` tokens) sent one
  at a time, alternately straight to a replica and through the router; per repeat the median
  of each, and the best repeat of each is reported, with router - direct in ms (and the same
  difference between the fastest single requests: on a machine whose cores the replicas and
  others share, medians move by milliseconds between runs).
- Multi-turn chats, per policy: `--chats` conversations, each with its own long system prompt,
  `--turns` turns each (the next turn carries the previous reply), `--clients` conversations at
  once. Per replica: prefix-cache lookups, hits and hit ratio, and prompt tokens restored
  (deltas of its /metrics JSON). The server counts as a hit any restored prefix, the chat
  template's first tokens included, so the hit ratio is near 1 under any policy; what routing
  changes is how much is restored: `follow_ups_reusing_previous_turn`, the share of turns after
  the first whose reply says (usage.prompt_tokens_details.cached_tokens) the previous prompt was
  restored (1.0: every turn went where the chat's last turn went), and
  `saved_token_share`, prompt tokens restored over prompt tokens sent. Also the median request
  time per policy: the two policies run one after the other, so it compares only on a machine
  nothing else loads meanwhile (the token counts do not depend on that).

Last stdout line: one JSON object (with machine()).

    python -m bench.router [--model PATH] [--chats 16] [--turns 4] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from bench.machine import machine
from bench.replicas import Replicas

PREFIX_KEYS = ("prefix_cache_lookups", "prefix_cache_hits", "prefix_cache_saved_tokens")
# the previous prompt's last few tokens (its generation header) are not restored: the template
# renders the reply's turn differently. A turn adds far more (a user turn and a reply), so a
# restore within HEADER of the previous prompt came from the previous turn, not an older one.
HEADER = 16
# clients in lockstep (every request about as long) take turns in a fixed order, so round robin
# would send each chat to the replica of its previous turn every time (an even number of
# clients) or never (an odd one); a random pause before each turn (`--think-s`: up to about a
# request's time), seeded per chat, breaks the step, as independent users would
WORDS = "harbor lantern orchard copper meadow quarry thistle ember falcon granite willow saffron".split()


def post(client: httpx.Client, url: str, body: dict) -> dict:
    r = client.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


def added_latency(r: Replicas, repeats: int, requests: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    best = {"direct": float("inf"), "router": float("inf")}
    fastest = dict(best)  # the quickest single request of each: what contention on a shared machine leaves
    with httpx.Client(timeout=120) as c:
        for url in (*r.urls, r.router_url):  # warm-up: both replicas, the router's connections
            post(c, url, body)
        for _ in range(repeats):
            times = {"direct": [], "router": []}
            for i in range(requests):
                # alternate which goes first, and which replica is asked directly (round robin
                # through the router reaches both)
                order = ("direct", "router") if i % 2 == 0 else ("router", "direct")
                for mode in order:
                    url = r.urls[i % len(r.urls)] if mode == "direct" else r.router_url
                    t = time.perf_counter()
                    post(c, url, body)
                    times[mode].append(time.perf_counter() - t)
            for mode, ts in times.items():
                best[mode] = min(best[mode], statistics.median(ts))
                fastest[mode] = min(fastest[mode], *ts)
    return {"direct_ms": round(best["direct"] * 1e3, 2), "router_ms": round(best["router"] * 1e3, 2),
            "added_ms": round((best["router"] - best["direct"]) * 1e3, 2),
            "router_over_direct": round(best["router"] / best["direct"], 3),
            "added_ms_fastest": round((fastest["router"] - fastest["direct"]) * 1e3, 2),
            "repeats": repeats, "requests_per_repeat": requests, "max_tokens": max_tokens}


def system_prompt(chat: int, words: int) -> str:
    # distinct from the first word on, so chats share nothing but the template's few tokens
    return f"Conversation {chat}. " + " ".join(WORDS[(chat * 7 + i * (chat % 5 + 1)) % len(WORDS)]
                                              for i in range(words))


def question(k: int, t: int, words: int) -> str:
    return f"Question {t}: tell me about " + " and ".join(WORDS[(k + t + i) % len(WORDS)] for i in range(words // 2))


def multi_turn(r: Replicas, chats: int, turns: int, clients: int, max_tokens: int, system_words: int,
               user_words: int, think_s: float) -> dict:
    before = [r.stats(i) for i in range(len(r.urls))]
    prompt_tokens, reused, follow_ups, latencies = [0], [0], [0], []

    def chat(k: int) -> float:
        messages = [{"role": "system", "content": system_prompt(k, system_words)}]
        t0, previous, think = time.perf_counter(), None, random.Random(k)
        with httpx.Client(timeout=600) as c:
            for t in range(turns):
                time.sleep(think.uniform(0, think_s))  # see --think-s
                messages.append({"role": "user", "content": question(k, t, user_words)})
                t1 = time.perf_counter()
                reply = post(c, r.router_url, {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                               "ignore_eos": True})
                latencies.append(time.perf_counter() - t1)
                usage = reply["usage"]
                prompt_tokens[0] += usage["prompt_tokens"]
                if previous is not None:  # did this turn restore the previous prompt (see HEADER)?
                    follow_ups[0] += 1
                    reused[0] += usage["prompt_tokens_details"]["cached_tokens"] >= previous - HEADER
                previous = usage["prompt_tokens"]
                messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        chat_s = list(pool.map(chat, range(chats)))
    wall = time.perf_counter() - t0
    replicas = []
    for i, b in enumerate(before):
        a = r.stats(i)
        d = {k: a[k] - b[k] for k in PREFIX_KEYS}
        replicas.append({"requests": d["prefix_cache_lookups"], "hits": d["prefix_cache_hits"],
                         "hit_ratio": round(d["prefix_cache_hits"] / max(d["prefix_cache_lookups"], 1), 3),
                         "saved_tokens": d["prefix_cache_saved_tokens"]})
    lookups, hits = sum(x["requests"] for x in replicas), sum(x["hits"] for x in replicas)
    saved = sum(x["saved_tokens"] for x in replicas)
    return {"policy": r.policy, "replicas": replicas, "hit_ratio": round(hits / max(lookups, 1), 3),
            "follow_ups_reusing_previous_turn": round(reused[0] / max(follow_ups[0], 1), 3),
            "saved_token_share": round(saved / max(prompt_tokens[0], 1), 3), "prompt_tokens": prompt_tokens[0],
            "request_s_median": round(statistics.median(latencies), 3), "wall_s": round(wall, 2),
            "chat_s_mean": round(statistics.mean(chat_s), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the demo checkpoint, random weights, real vocabulary)")
    p.add_argument("--tokenizer", help="default: the checkpoint's (the Gemma 4 vocabulary for the demo)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-requests", type=int, default=20, help="per mode per repeat")
    p.add_argument("--latency-tokens", type=int, default=1)
    p.add_argument("--chats", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--clients", type=int, default=4, help="chats in flight at once")
    p.add_argument("--max-tokens", type=int, default=16, help="per reply in the chats")
    p.add_argument("--system-words", type=int, default=400, help="each chat's system prompt, in words")
    p.add_argument("--think-s", type=float, default=4.0, help="most seconds a chat waits before a turn "
                                                                "(uniform; about a request's time here)")
    p.add_argument("--user-words", type=int, default=30, help="each user turn, in words")
    args = p.parse_args()
    from unigemma.cli import demo_checkpoint
    from unigemma.vocab import gemma4_vocab_gguf

    model = args.model or demo_checkpoint()
    tokenizer = args.tokenizer or (None if args.model else gemma4_vocab_gguf())
    serve = ("--dtype", args.dtype, "--max-len", "4096", "--max-seqs", str(max(args.clients, 4)))
    out = {}
    for policy in ("round_robin", "cache_aware"):
        with Replicas(model, tokenizer, n=2, policy=policy, threads=args.threads, serve_args=serve) as r:
            if policy == "round_robin":
                out["latency"] = added_latency(r, args.repeats, args.latency_requests, args.latency_tokens)
                print(f"latency: {out['latency']}", file=sys.stderr)
            out[policy] = multi_turn(r, args.chats, args.turns, args.clients, args.max_tokens, args.system_words,
                                     args.user_words, args.think_s)
            print(f"{policy}: {out[policy]}", file=sys.stderr)
    rr, ca = out["round_robin"], out["cache_aware"]
    print(json.dumps({"bench": "router", "router": "sglang-router " + _version(), "replicas": 2,
                      "model": args.model or "demo", "dtype": args.dtype, **machine(args.threads),
                      "added_latency": out["latency"],
                      "multi_turn": {"chats": args.chats, "turns": args.turns, "clients": args.clients,
                                     "max_tokens": args.max_tokens, "system_words": args.system_words,
                                     "user_words": args.user_words, "think_s": args.think_s,
                                     "round_robin": rr, "cache_aware": ca,
                                     "cache_aware_over_round_robin_saved_tokens": round(
                                         ca["saved_token_share"] / max(rr["saved_token_share"], 1e-9), 3),
                                     "cache_aware_over_round_robin_request_s": round(
                                         ca["request_s_median"] / rr["request_s_median"], 3),
                                     "cache_aware_over_round_robin_wall": round(ca["wall_s"] / rr["wall_s"], 3)}}))


def _version() -> str:
    from importlib.metadata import version

    return version("sglang-router")


if __name__ == "__main__":
    torch.set_num_threads(1)  # this process only sends requests; the replicas have their own threads
    main()
