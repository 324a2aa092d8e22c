"""Server load benchmark: aggregate tokens/s and time to first token under 1, 4 and 16 streams.

Starts `unigemma serve`'s app in this process (uvicorn on a free 127.0.0.1 port; the demo
checkpoint unless --model) and, for each concurrency level c, runs c client threads that each
send `--requests` streaming chat completions back to back (fixed prompt, `--max-tokens`
tokens with ignore_eos so every reply has the same length). Per level: aggregate completion
tokens/s over the level's wall time, p50/p95 time to first token (request sent -> first chunk
carrying a token), requests/s. A warm-up request is excluded. Last stdout line: one JSON object.

    python -m bench.serve_load [--model PATH] [--levels 1,4,16] [--requests 3] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from bench.machine import machine


class Running:
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread, for the duration of a `with`."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def stream_once(client: httpx.Client, url: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed request."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                d = c.get("delta", {})
                if ttft is None and (d.get("content") or d.get("reasoning_content") or c.get("finish_reason")):
                    ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


def level(url: str, streams: int, requests: int, max_tokens: int) -> dict:
    ttfts, tokens, lock = [], [0], threading.Lock()

    def client():
        with httpx.Client(timeout=600) as c:
            for _ in range(requests):
                t, n = stream_once(c, url, max_tokens)
                with lock:
                    ttfts.append(t)
                    tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {"streams": streams, "requests": len(ttfts), "completion_tokens": tokens[0],
            "tokens_per_s": round(tokens[0] / wall, 2), "requests_per_s": round(len(ttfts) / wall, 3),
            "ttft_p50_s": round(statistics.median(ttfts), 4), "ttft_p95_s": round(q[18], 4),
            "wall_s": round(wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the multimodal demo checkpoint, random weights)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--requests", type=int, default=3, help="requests per stream per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import unigemma
    from unigemma.cli import demo_checkpoint
    from unigemma.server import ServerConfig, create_app
    from unigemma.vocab import gemma4_vocab_gguf

    levels = [int(x) for x in args.levels.split(",")]
    if args.model:
        gemma, name = unigemma.load(args.model, dtype=args.dtype), Path(args.model).name
    else:
        gemma, name = unigemma.load(demo_checkpoint(), dtype=args.dtype, tokenizer=gemma4_vocab_gguf()), "demo"
    app = create_app(gemma, ServerConfig(max_seqs=max(levels), max_len=1024, max_queue=4 * max(levels)))
    results = []
    with Running(app) as server:
        url = server.url + "/v1/chat/completions"
        with httpx.Client(timeout=600) as c:
            stream_once(c, url, 4)  # warm-up: first-call allocations, lazy imports
        for streams in levels:
            r = level(url, streams, args.requests, args.max_tokens)
            print(f"{streams:>3} streams: {r['tokens_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_s']:.3f} s  "
                  f"p95 {r['ttft_p95_s']:.3f} s  ({r['requests']} requests, {r['wall_s']} s)", file=sys.stderr)
            results.append(r)
        app.state.scheduler.stop()
    print(json.dumps({"bench": "serve_load", "model": name, "dtype": args.dtype, **machine(torch.get_num_threads()),
                      "max_tokens": args.max_tokens, "levels": results}))


if __name__ == "__main__":
    main()
