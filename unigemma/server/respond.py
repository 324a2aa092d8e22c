"""Turning running scheduler requests into OpenAI responses: one JSON body or an SSE stream.

Both watch the connection: when the client goes away, every request of the response is
cancelled (the scheduler frees the rows at its next step). A stream's first chunk carries the
role; content and `reasoning_content` deltas follow as the engine parses them; tool calls
come whole; each choice ends with a chunk holding its finish_reason; with
`stream_options.include_usage` a last chunk has the usage and no choices.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import convert
# the helpers every generating route shares (pumping, collecting, failures) live in replies.py
from .replies import Choice as _Choice, absorb as _absorb, collect as _collect, failure as _failure
from .replies import items as _items, pumping as _pumping, total_usage as _usage
from .sse import DONE, chunk, new_id


async def chat(request: Request, requests: list, body, model: str, tokenizer, meter):
    n = len(requests)
    prompt_tokens = requests[0].prompt_tokens
    cid = new_id("chatcmpl")
    if not body.stream:
        choices, created = await _collect(request, requests, meter)
        if isinstance(choices, JSONResponse):
            return choices
        out = []
        for i, c in enumerate(choices):
            msg = {"role": "assistant", "content": "".join(c.content)}
            reasoning = "".join(c.reasoning)
            if reasoning:
                msg["reasoning_content"] = reasoning
            if c.calls:
                msg["tool_calls"] = [{k: v for k, v in t.items() if k != "index"}
                                     for t in convert.openai_tool_calls(c.calls)]
                msg["content"] = msg["content"] or None
            choice = {"index": i, "message": msg, "finish_reason": c.finish,
                      "logprobs": {"content": convert.logprobs_chat(tokenizer, c.logprobs)} if body.logprobs else None}
            out.append(choice)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": out,
                "usage": _usage(prompt_tokens, choices)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        async with _pumping(request, requests, meter) as pump:
            choices = [_Choice() for _ in range(n)]
            for i in range(n):
                yield chunk(cid, model, pump.created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}])
            async for i, item in _items(pump, n):
                if isinstance(item, BaseException):
                    yield sse_error(item)
                    break
                c = choices[i]
                calls_before = len(c.calls)
                _absorb(c, item)
                delta = {}
                if item.content:
                    delta["content"] = item.content
                if item.reasoning:
                    delta["reasoning_content"] = item.reasoning
                if item.tool_calls:
                    delta["tool_calls"] = convert.openai_tool_calls(item.tool_calls, calls_before)
                lp = None
                if body.logprobs and item.logprobs:
                    lp = {"content": convert.logprobs_chat(tokenizer, item.logprobs)}
                if delta or lp:
                    yield chunk(cid, model, pump.created, [{"index": i, "delta": delta, "logprobs": lp,
                                                            "finish_reason": None}])
                if item.finish_reason is not None:
                    yield chunk(cid, model, pump.created, [{"index": i, "delta": {}, "logprobs": None,
                                                            "finish_reason": item.finish_reason}])
            if include_usage:
                yield chunk(cid, model, pump.created, [], usage=_usage(prompt_tokens, choices))
            yield DONE

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse_error(e: BaseException) -> bytes:
    from .sse import sse

    return sse(_failure(e)[1])


def _completion_logprobs(tokenizer, entries: list[dict]) -> dict:
    tokens = [tokenizer.token_bytes(e["token_id"]).decode("utf-8", "replace") for e in entries]
    top = [{tokenizer.token_bytes(t).decode("utf-8", "replace"): convert.finite(lp) for t, lp in e["top"]}
           for e in entries]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [convert.finite(e["logprob"]) for e in entries], "top_logprobs": top,
            "text_offset": offsets}


async def completion(request: Request, requests: list, body, model: str, tokenizer, meter):
    n = len(requests)
    prompt_tokens = sum(r.prompt_tokens for r in requests[::body.n])
    cid = new_id("cmpl")
    want_lp = body.logprobs is not None
    if not body.stream:
        choices, created = await _collect(request, requests, meter)
        if isinstance(choices, JSONResponse):
            return choices
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": "".join(c.reasoning) + "".join(c.content), "finish_reason": c.finish,
                             "logprobs": _completion_logprobs(tokenizer, c.logprobs) if want_lp else None}
                            for i, c in enumerate(choices)],
                "usage": _usage(prompt_tokens, choices, reasoning=False)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        async with _pumping(request, requests, meter) as pump:
            choices = [_Choice() for _ in range(n)]
            async for i, item in _items(pump, n):
                if isinstance(item, BaseException):
                    yield sse_error(item)
                    break
                _absorb(choices[i], item)
                text = item.reasoning + item.content
                lp = _completion_logprobs(tokenizer, item.logprobs) if want_lp and item.logprobs else None
                if text or lp or item.finish_reason is not None:
                    yield chunk(cid, model, pump.created, [{"index": i, "text": text, "logprobs": lp,
                                                            "finish_reason": item.finish_reason}],
                                obj="text_completion")
            if include_usage:
                yield chunk(cid, model, pump.created, [], obj="text_completion",
                            usage=_usage(prompt_tokens, choices, reasoning=False))
            yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
