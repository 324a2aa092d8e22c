"""Bounded load on a real server: concurrent clients, streaming and not, some hanging up early.
Every request is answered or cleanly refused (429), no row or thread is left behind, and the
server's memory is flat after a warm-up round. The CI size is small (2 shared cores); the
`slow` variant is the issue's 32 clients × 200 requests."""

from __future__ import annotations

import ctypes
import gc
import json
import random
import threading
import time

import httpx
import pytest
from server_helpers import Running, tiny_gemma

from unigemma.server import ServerConfig, create_app

PREFIX_MB = 16  # a small prefix store: exercised under load, its memory bounded


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gemma = tiny_gemma(tmp_path_factory.mktemp("load"))
    app = create_app(gemma, ServerConfig(max_seqs=8, max_len=256, max_queue=20, prefix_cache_mb=PREFIX_MB))
    with Running(app) as s:
        s.scheduler = app.state.scheduler
        yield s
        app.state.scheduler.stop()


def rss_mib() -> float:
    """Resident MiB after glibc hands its free pages back: the prefix cache's many small
    long-lived tensors leave the heap fragmented, so without the trim, freed (and reusable)
    memory still counts; with it this measures what is live (tried: +350 MiB over 3 rounds
    untrimmed, flat trimmed, with a 16 MiB store)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: measure as is
        pass
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 1024


def one(client: httpx.Client, url: str, rng: random.Random, outcomes: list) -> None:
    body = {"messages": [{"role": "user", "content": f"hello {rng.random()}"}],
            "max_tokens": rng.randint(2, 12), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
    mode = rng.choice(["plain", "stream", "stream", "hangup"])
    try:
        if mode == "plain":
            r = client.post(url, json=body)
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
            outcomes.append("ok" if ok else ("rejected" if r.status_code == 429 else f"bad {r.status_code} {r.text}"))
            return
        with client.stream("POST", url, json={**body, "stream": True, "max_tokens": 60 if mode == "hangup"
                                              else body["max_tokens"]}) as r:
            if r.status_code == 429:
                r.read()
                outcomes.append("rejected")
                return
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if mode == "hangup" and len(lines) >= 3:
                    outcomes.append("hung up")
                    return
            events = [x for x in lines if x]
            ok = r.status_code == 200 and events[-1] == "data: [DONE]"
            finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines
                      if x.startswith("data: {") and json.loads(x[6:])["choices"]]
            outcomes.append("ok" if ok and finish[-1] in ("length", "stop") else f"bad stream {lines[-3:]}")
    except httpx.HTTPError as e:
        outcomes.append(f"bad {type(e).__name__}: {e}")


def backoff(outcomes: list, rng: random.Random) -> None:
    # a refused client waits a little before its next request, as OpenAI's client does on 429
    if outcomes and outcomes[-1] == "rejected":
        time.sleep(rng.uniform(0.05, 0.25))


def hammer(url: str, clients: int, per_client: int, seed: int) -> list:
    outcomes: list = []

    def run(i):
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=120) as c:
            mine: list = []
            for _ in range(per_client):
                one(c, url, rng, mine)
                backoff(mine, rng)
            outcomes.extend(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return outcomes


def settle(scheduler) -> None:
    deadline = time.time() + 30
    while scheduler.has_work() and time.time() < deadline:
        time.sleep(0.02)



def check_round(server, clients, per_client, seed):
    outcomes = hammer(server.url + "/v1/chat/completions", clients, per_client, seed)
    assert len(outcomes) == clients * per_client
    bad = [o for o in outcomes if o not in ("ok", "rejected", "hung up")]
    assert not bad, bad[:5]
    assert outcomes.count("ok") >= len(outcomes) // 4, outcomes  # many get through; a full queue refuses some
    settle(server.scheduler)
    assert not server.scheduler.running and server.scheduler.cache.n == 0  # hung-up rows were freed
    return outcomes


def test_concurrent_clients_are_all_answered_and_memory_is_flat(server):
    check_round(server, 32, 2, seed=0)  # warm-up: allocator pools, thread stacks, lazy imports
    gc.collect()
    before = rss_mib()
    # pump threads of other test modules' servers (stopped with requests in flight) are not ours
    others = set(threading.enumerate())
    for seed in (1, 2):
        outcomes = check_round(server, 32, 2, seed)
    gc.collect()
    time.sleep(0.5)
    assert rss_mib() - before < 40 + PREFIX_MB, f"RSS grew from {before:.0f} to {rss_mib():.0f} MiB"
    pumps = lambda: [t for t in threading.enumerate()  # noqa: E731
                     if t.name.startswith("unigemma-pump") and t not in others]
    deadline = time.time() + 10
    while pumps() and time.time() < deadline:
        time.sleep(0.05)
    assert not pumps()  # each request's bridge thread ends with it
    print(f"\nload: 32 clients x 2 requests x 2 rounds; last round {outcomes.count('ok')} ok, "
          f"{outcomes.count('rejected')} rejected (429), {outcomes.count('hung up')} hung up; "
          f"RSS {before:.0f} -> {rss_mib():.0f} MiB")


@pytest.mark.slow
def test_issue_sized_load(server):
    """32 clients × 200 requests (minutes on 2 cores)."""
    gc.collect()
    check_round(server, 32, 5, seed=10)
    before = rss_mib()
    t0 = time.time()
    outcomes = check_round(server, 32, 200, seed=11)
    gc.collect()
    assert rss_mib() - before < 60 + PREFIX_MB
    print(f"\nload: 32 clients x 200 requests in {time.time() - t0:.0f} s: {outcomes.count('ok')} ok, "
          f"{outcomes.count('rejected')} rejected (429), {outcomes.count('hung up')} hung up; "
          f"RSS {before:.0f} -> {rss_mib():.0f} MiB")
