"""Replicas behind SGLang's router (sglang-router): 2 `unigemma serve` processes of a tiny random
model and the router, on loopback (bench/replicas.py starts them as README "Scaling out" shows).

- what the router sends is accepted: its own extension fields at their defaults (schema.py);
- the router learns the served name from /server_info (else it files workers as "unknown");
- 64 concurrent requests through the router are all answered, by both replicas;
- a replica killed (SIGKILL) mid-run: its in-flight streams end at once with an error (the router
  closes them unfinished; nothing hangs), a non-streamed request either completes (the router
  retries it on the survivor) or gets an error status, and new requests go to the survivor.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ (the launcher) beside tests/

from unigemma.server.schema import ChatRequest, CompletionRequest  # noqa: E402

# what sglang-router 0.3.2 adds to every request it forwards (seen on a capturing backend)
ROUTER_CHAT = {"logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
               "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
               "return_hidden_states": False}
ROUTER_COMPLETION = {"echo": False, "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                     "return_hidden_states": False}


def test_router_fields_at_their_defaults_are_accepted():
    ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **ROUTER_CHAT})
    CompletionRequest.model_validate({"prompt": "hi", **ROUTER_COMPLETION})


@pytest.mark.parametrize("field,value", [("no_stop_trim", True), ("skip_special_tokens", False),
                                         ("separate_reasoning", False), ("continue_final_message", True),
                                         ("return_hidden_states", True), ("stream_reasoning", "yes")])
def test_router_fields_asking_for_something_else_are_refused(field, value):
    # a value that would change the reply is a feature this server lacks: still "unsupported field"
    with pytest.raises(ValidationError, match=f"unsupported field '{field}'"):
        ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], field: value})


# -- the processes -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    pytest.importorskip("sglang_router", reason="sglang-router (dev extra) is not installed")
    from bench.replicas import Replicas
    from server_helpers import tiny_checkpoint
    from unigemma.vocab import gemma4_vocab_gguf

    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("router"))
    # round robin: which replica answers is known, so both must have served
    with Replicas(ckpt, gemma4_vocab_gguf(), n=2, policy="round_robin",
                  serve_args=("--dtype", "float32", "--max-len", "1024", "--max-seqs", "8"),
                  router_args=("--health-check-interval-secs", "1")) as r:
        yield r


def chat(i: int, max_tokens: int, **extra) -> dict:
    return {"model": "whatever-the-client-says", "messages": [{"role": "user", "content": f"request {i}"}],
            "max_tokens": max_tokens, "ignore_eos": True, **extra}


def test_router_knows_the_served_name_and_the_load(replicas):
    # from /server_info at registration (without it the router lists the model as "unknown")
    models = httpx.get(replicas.router_url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-server-ckpt"]
    # power_of_two reads /get_load (KV tokens in use), aggregated in the router's /get_loads
    (load,) = httpx.get(replicas.urls[0] + "/get_load", timeout=10).json()
    assert load["dp_rank"] == 0 and load["num_tokens"] >= 0 and load["num_reqs"] >= 0
    loads = httpx.get(replicas.router_url + "/get_loads", timeout=10).json()["workers"]
    assert sorted(w["worker"] for w in loads) == sorted(replicas.urls) and all(w["load"] >= 0 for w in loads)


def test_64_concurrent_requests_are_all_answered_by_both_replicas(replicas):
    before = [replicas.stats(i)["requests"]["ok"] for i in range(2)]

    def one(i):
        r = httpx.post(replicas.router_url + "/v1/chat/completions", json=chat(i, 4), timeout=120)
        return r.status_code, r.json()

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one, range(64)))
    assert [s for s, _ in answers] == [200] * 64, [a for a in answers if a[0] != 200][:3]
    assert all(b["usage"]["completion_tokens"] == 4 for _, b in answers)
    served = [replicas.stats(i)["requests"]["ok"] - before[i] for i in range(2)]
    assert sum(served) == 64 and min(served) >= 16, served  # round robin: about half each


def stream(url: str, body: dict) -> tuple[str, float]:
    """How a streamed reply ended ('done': [DONE] after every token; 'cut': the connection closed
    first; 'error': an error status or event) and when (time.monotonic())."""
    tokens = 0
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            if r.status_code != 200:
                return "error", time.monotonic()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    return ("done" if tokens == body["max_tokens"] else "short"), time.monotonic()
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return "error", time.monotonic()
                    tokens += sum(bool(c["delta"].get("content")) for c in event["choices"])
        return "cut", time.monotonic()
    except httpx.RemoteProtocolError:  # the router closed the chunked body unfinished
        return "cut", time.monotonic()


def whole(url: str, body: dict) -> tuple[str, float]:
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    except httpx.RemoteProtocolError:
        return "cut", time.monotonic()
    if r.status_code != 200:
        return "error", time.monotonic()
    done = r.json()["usage"]["completion_tokens"] == body["max_tokens"]
    return ("done" if done else "short"), time.monotonic()


def test_a_replica_killed_mid_run(replicas):
    # runs last in this module: it leaves one replica
    n, long = 8, 400  # 4 per replica; 400 tokens take several seconds on the tiny model
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream if i % 2 == 0 else whole, replicas.router_url, chat(100 + i, long))
                   for i in range(n)]
        deadline = time.monotonic() + 30
        while replicas.stats(0)["running"] + replicas.stats(0)["waiting"] < 2:
            assert time.monotonic() < deadline, "the requests never reached replica 0"
            time.sleep(0.05)
        killed_at = time.monotonic()
        replicas.kill(0)
        ends = [f.result(timeout=90) for f in futures]
    outcomes = [o for o, _ in ends]
    # nothing hangs, nothing is a 200 with a reply cut short; the streams on replica 0 are cut
    assert set(outcomes) <= {"done", "cut", "error"}, ends
    assert "cut" in outcomes or "error" in outcomes, ends
    assert outcomes.count("done") >= n // 2, ends  # replica 1's own, at least
    failed_at = [t - killed_at for o, t in ends if o != "done"]
    assert max(failed_at) < 5, failed_at  # they failed at the kill, not at a timeout

    # new requests go to the survivor (the router retries past the dead one, then drops it)
    before = replicas.stats(1)["requests"]["ok"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: whole(replicas.router_url, chat(200 + i, 4)), range(8)))
    assert [o for o, _ in answers] == ["done"] * 8, answers
    assert replicas.stats(1)["requests"]["ok"] - before == 8
