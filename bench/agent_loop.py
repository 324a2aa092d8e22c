"""An agent loop over the API, with automatic prefix caching and without: one JSON line.

A ~2,000-token system prompt with tools, then `--turns` tool-call turns: each request is the
whole history, each reply a forced, greedy tool call (tool_choice names the tool, one call per
turn; its one argument is an enum, so the call ends in a few tokens), and the next turn appends
that call and a tool result. Two servers (uvicorn on loopback, the `openai` client) share one
model: one with `--prefix-cache-mb`, one with 0; the turns alternate between them (which goes
first alternates too), so both see the same machine state. Per arm: total wall time of the
loop, and per turn the prompt tokens, the cached ones and the prefilled ones (prompt - cached),
next to the tokens the turn added to the history (target: prefilled ≈ added).

Model: bench/checkpoint.py's random checkpoint (default shape: 12B layout scaled down, where a
2,000-token prefill dominates a turn on a CPU), bf16, this CPU's fast kernels.

    python -m bench.agent_loop [--turns 10] [--system-tokens 2000] [--threads 2] [--root DIR] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from bench.checkpoint import make_checkpoint
from bench.machine import machine

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup", "description": "Look a topic up in the knowledge base and return the passage.",
        "parameters": {"type": "object", "properties": {
            "topic": {"type": "string", "enum": ["alpha", "beta", "gamma", "delta"],
                      "description": "Which topic to look up."}}, "required": ["topic"]}}},
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "The expression, e.g. 3 * (4 + 5)."}},
            "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "send_report", "description": "Send the final report to the user and stop.",
        "parameters": {"type": "object", "properties": {
            "summary": {"type": "string", "description": "What was found, in a few sentences."}},
            "required": ["summary"]}}},
]
FORCED = {"type": "function", "function": {"name": "lookup"}}


def system_prompt(tokenizer, target: int) -> str:
    """Operating rules numbered until the text is `target` tokens long."""
    lines, n, i = ["You are a research agent. Follow every rule below."], 0, 0
    while n < target:
        i += 1
        lines.append(f"Rule {i}: when a question touches topic {i % 7} or subtopic {i * 13 % 97}, look it up "
                     f"first, quote the passage that supports each claim, and never invent figures ({i}).")
        n = len(tokenizer.encode("\n".join(lines), add_special_tokens=False))
    return "\n".join(lines)


class Served:
    """An app under uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        from unigemma.server.serve import make_server

        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = make_server(app, "127.0.0.1", self.port, shutdown_timeout=2)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def turn(client, messages: list, max_tokens: int) -> tuple[dict, float, dict]:
    """One request: (assistant message to append, wall seconds, usage figures)."""
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="bench", messages=messages, tools=TOOLS, tool_choice=FORCED,
                                       parallel_tool_calls=False, temperature=0, max_tokens=max_tokens)
    wall = time.perf_counter() - t0
    msg = r.choices[0].message
    calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
             for c in msg.tool_calls or []]
    if not calls:  # the grammar forces a call; a reply cut by max_tokens would lack one
        raise RuntimeError(f"no tool call in the reply (finish_reason {r.choices[0].finish_reason})")
    u = r.usage
    return ({"role": "assistant", "content": None, "tool_calls": calls}, wall,
            {"prompt": u.prompt_tokens, "cached": u.prompt_tokens_details.cached_tokens,
             "completion": u.completion_tokens})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-cache-mb", type=float, default=1024)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--root", default=None, help="where the benchmark checkpoint is (written there once)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the benchmark model (bench_config)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import openai

    import unigemma
    from unigemma.server import ServerConfig, create_app
    from unigemma.vocab import gemma4_vocab_gguf

    path = make_checkpoint(args.root, layers=args.layers)
    gemma = unigemma.load(path, tokenizer=gemma4_vocab_gguf())
    system = system_prompt(gemma.tokenizer, args.system_tokens)
    arms = {}
    for name, mb in (("cached", args.prefix_cache_mb), ("uncached", 0)):
        config = ServerConfig(model_name="bench", max_seqs=2, max_len=8192, prefix_cache_mb=mb)
        served = Served(create_app(gemma, config))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="none", max_retries=0,
                               timeout=3600)
        turn(client, [{"role": "user", "content": "Warm up."}], args.max_tokens)  # not timed; primes nothing shared
        arms[name] = {"served": served, "client": client, "wall": [], "usage": [], "calls": [],
                      "messages": [{"role": "system", "content": system},
                                   {"role": "user", "content": "Find out what the knowledge base says about each "
                                                               "topic, one lookup at a time, then report."}]}
    for k in range(args.turns):
        order = ["cached", "uncached"] if k % 2 == 0 else ["uncached", "cached"]
        for name in order:
            a = arms[name]
            reply, wall, usage = turn(a["client"], a["messages"], args.max_tokens)
            call = reply["tool_calls"][0]
            a["wall"].append(wall)
            a["usage"].append(usage)
            a["calls"].append(call["function"]["arguments"])
            result = (f"Passage {k + 1} for {call['function']['arguments']}: the figures for this topic rose "
                      f"by {3 * k + 2} percent over {k + 4} quarters; see table {k + 1}.")
            a["messages"] = a["messages"] + [reply, {"role": "tool", "tool_call_id": call["id"], "content": result}]
    stats = {name: arms[name]["served"].app.state.scheduler.stats() for name in arms}
    for a in arms.values():
        a["served"].close()

    def summary(name):
        a = arms[name]
        prompts = [u["prompt"] for u in a["usage"]]
        prefilled = [u["prompt"] - u["cached"] for u in a["usage"]]
        added = [prompts[0]] + [b - c for c, b in zip(prompts, prompts[1:])]
        s = stats[name]
        out = {"wall_s": round(sum(a["wall"]), 3), "turn_wall_s": [round(w, 3) for w in a["wall"]],
               "prompt_tokens": prompts, "cached_tokens": [u["cached"] for u in a["usage"]],
               "prefill_tokens": prefilled, "added_tokens": added,
               "mean_prefill_tokens_after_first": round(sum(prefilled[1:]) / max(1, len(prefilled) - 1), 1),
               "mean_added_tokens_after_first": round(sum(added[1:]) / max(1, len(added) - 1), 1),
               "completion_tokens": [u["completion"] for u in a["usage"]]}
        if "prefix_cache_lookups" in s:
            out["prefix_cache"] = {k.removeprefix("prefix_cache_"): v for k, v in s.items() if k.startswith("prefix")}
        return out

    cached, uncached = summary("cached"), summary("uncached")
    c = gemma.config.text
    print(json.dumps({
        "bench": "agent_loop", "machine": machine(args.threads),
        "model": {"checkpoint": path.name, "hidden": c.hidden_size, "layers": c.num_hidden_layers,
                  "sliding_window": c.sliding_window, "dtype": str(gemma.model.dtype).removeprefix("torch."),
                  "prefill_chunk": gemma.engine.prefill_chunk},
        "turns": args.turns, "system_prompt_tokens": len(gemma.tokenizer.encode(system, add_special_tokens=False)),
        "prefix_cache_mb": args.prefix_cache_mb, "cached": cached, "uncached": uncached,
        "wall_speedup": round(uncached["wall_s"] / cached["wall_s"], 2),
        "prefill_token_ratio": round(sum(uncached["prefill_tokens"]) / max(1, sum(cached["prefill_tokens"])), 2),
        # bf16: the two arms prefill in other chunks, so logits differ by rounding and a near tie
        # between the enum's values may flip (fp32 equality is what tests/test_prefix_cache.py checks)
        "same_tool_calls": arms["cached"]["calls"] == arms["uncached"]["calls"],
        "first_differing_turn": next((k for k, (a, b) in enumerate(zip(arms["cached"]["calls"],
                                                                        arms["uncached"]["calls"])) if a != b), None),
    }))


if __name__ == "__main__":
    main()
