"""unigemma-mini on multimodal prompts: speculative decoding with the shipped MTP drafter, and
prefix reuse in the server. One JSON line.

    python -m bench.mini_serving --data data/mm/heldout.jsonl --model runs/mini/model [--items 24]

- drafting: held-out description and spoken-number items (the kinds with multi-token answers),
  greedy, with and without `--draft gemma-3-270m --draft-tokens 4` (trained by self-distillation on the plain
  Gemma 3 270M the mini's decoder comes from, never on media or on the mini's adapter): draft
  acceptance, tokens per target forward, decode speed, and whether every reply is the same;
- prefix reuse: the server (its default prefix cache), each held-out picture asked two questions
  in two separate requests: the second's prompt tokens restored from the cache (the picture's
  block included: the cache keys media by content) and its time to first token against the first's.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.serve_load import Running
from bench.mmdata.predict import select
from bench.mmdata.score import prompts, read_jsonl


def drafting(model: str, records: list[dict], data: Path, dtype: str) -> dict:
    import unigemma
    from unigemma.generate.params import SamplingParams

    asked = prompts(data)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    out = {}
    replies = {}
    for name, draft in (("plain", None), ("drafted", "gemma-3-270m")):
        # a fixed draft length: the adaptive one follows wall-clock costs and may not draft at all
        gemma = unigemma.load(model, dtype=dtype, draft=draft, draft_tokens=4 if draft else None)
        gemma.chat(asked[records[0]["id"]], params=params)  # warm-up
        drafted = accepted = forwards = tokens = 0
        decode_s = 0.0
        got = []
        for r in records:
            reply = gemma.chat(asked[r["id"]], params=params)
            t = reply.timings
            drafted, accepted, forwards = drafted + t.drafted, accepted + t.accepted, forwards + t.verify_forwards
            tokens += reply.completion_tokens
            decode_s += t.completion_tokens / t.decode_tokens_per_s if t.decode_tokens_per_s else 0.0
            got.append(reply.content)
        replies[name] = got
        out[name] = {"tokens": tokens, "decode_tokens_per_s": round(tokens / decode_s, 1) if decode_s else None}
        if draft:
            out[name].update(drafted=drafted, accepted=accepted, acceptance=round(accepted / max(1, drafted), 3),
                             tokens_per_target_forward=round((accepted + forwards) / max(1, forwards), 3))
    out["same_replies"] = replies["plain"] == replies["drafted"]
    out["speedup"] = (round(out["drafted"]["decode_tokens_per_s"] / out["plain"]["decode_tokens_per_s"], 3)
                      if out["plain"]["decode_tokens_per_s"] and out["drafted"]["decode_tokens_per_s"] else None)
    return out


def prefix_reuse(model: str, records: list[dict], data: Path, dtype: str) -> dict:
    import httpx

    import unigemma
    from unigemma.server import ServerConfig, create_app

    gemma = unigemma.load(model, dtype=dtype)
    firsts, seconds, restored, prompt_tokens = [], [], 0, 0
    with Running(create_app(gemma, ServerConfig(model_name="mini", max_seqs=2, max_len=512))) as s:
        for r in records:
            png = base64.b64encode((data.parent / r["messages"][0]["content"][0]["image"]).read_bytes()).decode()
            image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}
            usage = []
            for question in ("How many shapes are there?", "Describe the picture in one sentence."):
                body = {"model": "mini", "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "user", "content": [image, {"type": "text", "text": question}]}]}
                t0 = time.perf_counter()
                resp = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120).json()
                usage.append((time.perf_counter() - t0, resp["usage"]))
            firsts.append(usage[0][0])
            seconds.append(usage[1][0])
            restored += (usage[1][1].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            prompt_tokens += usage[1][1]["prompt_tokens"]
    return {"pictures": len(records), "second_question_prompt_tokens": prompt_tokens,
            "restored_tokens": restored, "restored_share": round(restored / max(1, prompt_tokens), 3),
            "first_request_s": round(sorted(firsts)[len(firsts) // 2], 4),
            "second_request_s": round(sorted(seconds)[len(seconds) // 2], 4)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a trained mini checkpoint (python -m unigemma.weights.mini OUT --trained RUN_DIR)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--items", type=int, default=24, help="items per part")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    records = read_jsonl(args.data)
    half = max(1, args.items // 2)
    long_answers = select(records, half, ["description", "number"])
    pictures = select(records, args.items, ["count"])
    out = {"bench": "mini_serving", **machine(torch.get_num_threads()), "dtype": args.dtype,
           "drafting": drafting(args.model, long_answers, args.data, args.dtype),
           "prefix_reuse": prefix_reuse(args.model, pictures, args.data, args.dtype)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
