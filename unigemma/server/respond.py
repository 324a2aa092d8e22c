"""Turning running scheduler requests into OpenAI responses: one JSON body or an SSE stream.

Both watch the connection: when the client goes away, every request of the response is
cancelled (the scheduler frees the rows at its next step). A chat stream's first chunk of a
choice carries the role, sent with the choice's first delta, so after prefill (clients time the
first token from it); content and `reasoning_content` deltas follow as the engine parses them;
tool calls come whole; each choice ends with a chunk holding its finish_reason; with
`stream_options.include_usage` a last chunk has the usage and no choices. With
`return_token_ids` (vLLM's extension, which llama-benchy sends) the prompt's ids come with the
first chunk (whole reply: at its top; completions: on each choice) and each choice or delta
carries its token ids. Each finished choice's timings go to the meter (/metrics histograms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import InputError
from . import convert
from .limits import Closing
from .schema import error_body
from .sse import DONE, END, Pump, chunk, new_id, usage

log = logging.getLogger("unigemma.server")


async def _watch(request: Request, pump: Pump) -> None:
    """Cancel the pump's requests when the client disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            pump.outcome = pump.outcome or "disconnected"
            pump.cancel()
            return


@contextlib.asynccontextmanager
async def pumping(request: Request, requests: list, meter):
    """The requests' Pump while a reply is written: it stops them when the client leaves, and
    the meter counts how the reply ended, once."""
    pump = Pump(requests, asyncio.get_running_loop())
    pump.meter = meter
    watcher = asyncio.create_task(_watch(request, pump))
    meter.live.add(pump)
    outcome = None
    try:
        yield pump
        outcome = pump.outcome or "ok"
    except Exception:
        outcome = pump.outcome or "failed"
        raise
    except BaseException:  # CancelledError or GeneratorExit: the client left, or the server is stopping
        outcome = pump.outcome or ("cancelled" if meter.closing else "disconnected")
        raise
    finally:
        meter.live.discard(pump)
        watcher.cancel()
        pump.cancel()  # a no-op for finished requests; frees the rows of any still running
        meter.count(outcome or "failed")  # each reply is counted once, whichever way it ended


def _status(e: BaseException) -> int:
    return 400 if isinstance(e, InputError) else 503 if isinstance(e, Closing) else 500


def failure(e: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for a failed generation; a 500's details go to the log only."""
    status = _status(e)
    if status == 400:
        return 400, error_body(str(e))
    if status == 503:
        return 503, error_body(str(e), "server_error", code="server_shutting_down")
    log.error("generation failed", exc_info=e)  # the details go to the log, not to the client
    return 500, error_body(f"generation failed: {type(e).__name__}", "server_error")


class Choice:
    """What one choice accumulated (non-streaming), or just its counts (streaming)."""

    def __init__(self):
        self.content, self.reasoning, self.calls, self.logprobs = [], [], [], []
        self.tokens, self.reasoning_tokens, self.finish = 0, 0, None
        self.token_ids: list[int] = []
        self.drafted = self.accepted = 0  # speculative decoding (from the last delta's timings)
        self.cached = 0  # prompt tokens restored from the prefix cache (the last delta's timings)


def _usage(prompt_tokens: int, choices: list[Choice], reasoning: bool = True) -> dict:
    return usage(prompt_tokens, sum(c.tokens for c in choices),
                 sum(c.reasoning_tokens for c in choices) if reasoning else None,
                 sum(c.drafted for c in choices), sum(c.accepted for c in choices),
                 cached_tokens=choices[0].cached if choices else 0)  # the prompt is counted once: its first choice


def absorb(c: Choice, delta) -> None:
    """Add one scheduler delta to what its choice accumulated."""
    c.tokens += len(delta.token_ids)
    c.token_ids += delta.token_ids
    if delta.reasoning:
        c.reasoning_tokens += len(delta.token_ids)
    c.content.append(delta.content)
    c.reasoning.append(delta.reasoning)
    c.calls += delta.tool_calls
    c.logprobs += delta.logprobs
    if delta.finish_reason is not None:
        c.finish = delta.finish_reason
    if delta.timings is not None:
        c.drafted, c.accepted = delta.timings.drafted, delta.timings.accepted
        c.cached = delta.timings.cached_tokens


async def items(pump: Pump, n: int):
    """(index, delta) from n requests until every one has ended; a failure is the last item,
    (index, exception)."""
    open_ = n
    while open_:
        i, item = await pump.get()
        if item is END:
            open_ -= 1
            continue
        if isinstance(item, BaseException):
            pump.outcome = pump.outcome or ("rejected" if _status(item) < 500 else "failed")
            yield i, item
            return
        if item.timings is not None:
            pump.meter.observe(item.timings)
        yield i, item


async def _collect(request: Request, requests: list, meter):
    """Every request's whole reply (non-streamed answers): (choices, created), or the error
    response of the first request that failed."""
    choices = [Choice() for _ in requests]
    async with pumping(request, requests, meter) as pump:
        async for i, item in items(pump, len(requests)):
            if isinstance(item, BaseException):
                status, err = failure(item)
                return JSONResponse(err, status_code=status), pump.created
            absorb(choices[i], item)
    return choices, pump.created


def _prompt_ids(request) -> list[int]:
    return request.inputs["input_ids"][0].tolist()


async def chat(request: Request, requests: list, body, model: str, tokenizer, meter):
    n = len(requests)
    prompt_tokens = requests[0].prompt_tokens
    cid = new_id("chatcmpl")
    want_ids = getattr(body, "return_token_ids", False)
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
            if want_ids:
                choice["token_ids"] = c.token_ids
            out.append(choice)
        reply = {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": out,
                 "usage": _usage(prompt_tokens, choices)}
        if want_ids:
            reply["prompt_token_ids"] = _prompt_ids(requests[0])
        return reply

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        async with pumping(request, requests, meter) as pump:
            choices = [Choice() for _ in range(n)]
            started = [False] * n
            first = {"prompt_token_ids": _prompt_ids(requests[0])} if want_ids else {}
            async for i, item in items(pump, n):
                if isinstance(item, BaseException):
                    yield sse_error(item)
                    break
                if not started[i]:  # the role with the first delta: after prefill, so TTFT is right
                    started[i] = True
                    yield chunk(cid, model, pump.created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                            "logprobs": None, "finish_reason": None}], **first)
                    first = {}
                c = choices[i]
                calls_before = len(c.calls)
                absorb(c, item)
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
                ids = {"token_ids": item.token_ids} if want_ids and item.token_ids else {}
                if delta or lp or ids:
                    yield chunk(cid, model, pump.created, [{"index": i, "delta": delta, "logprobs": lp,
                                                            "finish_reason": None, **ids}])
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

    return sse(failure(e)[1])


def _completion_logprobs(tokenizer, entries: list[dict], start: int = 0) -> dict:
    tokens = [tokenizer.token_bytes(e["token_id"]).decode("utf-8", "replace") for e in entries]
    top = [{tokenizer.token_bytes(t).decode("utf-8", "replace"): convert.finite(lp) for t, lp in e["top"]}
           for e in entries]
    offsets, pos = [], start
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [convert.finite(e["logprob"]) for e in entries], "top_logprobs": top,
            "text_offset": offsets}


def _joined(echo_lp: dict | None, lp: dict | None) -> dict | None:
    """An echoed prompt's logprobs followed by the completion's."""
    if echo_lp is None or lp is None:
        return echo_lp or lp
    return {k: echo_lp[k] + lp[k] for k in lp}


async def completion(request: Request, requests: list, body, model: str, tokenizer, meter, prompt_tokens: int,
                     echoes: list[tuple[str, dict | None]] | None = None, prompt_ids: list[list[int]] | None = None):
    """echoes: per choice, the prompt's text and logprobs (or None) that go before its
    completion (`echo`). With no requests (max_tokens 0) the echoes are the whole reply.
    prompt_ids: per choice, its prompt's token ids (return_token_ids)."""
    n = len(echoes) if echoes is not None else len(requests)
    want_ids = prompt_ids is not None
    echoes = echoes or [("", None)] * n
    cid = new_id("cmpl")
    want_lp = body.logprobs is not None
    if not body.stream:
        if requests:
            choices, created = await _collect(request, requests, meter)
            if isinstance(choices, JSONResponse):
                return choices
        else:  # scoring only: nothing was generated
            choices, created = [Choice() for _ in range(n)], int(time.time())
            meter.count("ok")
        out = []
        for i, (c, (echo, echo_lp)) in enumerate(zip(choices, echoes)):
            lp = _completion_logprobs(tokenizer, c.logprobs, len(echo)) if want_lp else None
            out.append({"index": i, "text": echo + "".join(c.reasoning) + "".join(c.content),
                        "finish_reason": c.finish or "length", "logprobs": _joined(echo_lp, lp)})
            if want_ids:
                out[-1].update(prompt_token_ids=prompt_ids[i], token_ids=c.token_ids)
        return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": out,
                "usage": _usage(prompt_tokens, choices, reasoning=False)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        async with pumping(request, requests, meter) as pump:
            choices = [Choice() for _ in range(n)]
            for i, (echo, echo_lp) in enumerate(echoes):
                ids = {"prompt_token_ids": prompt_ids[i], "token_ids": []} if want_ids else {}
                if echo or not requests or ids:
                    yield chunk(cid, model, pump.created, [{"index": i, "text": echo, "logprobs": echo_lp,
                                                            "finish_reason": None if requests else "length", **ids}],
                                obj="text_completion")
            offsets = [len(echo) for echo, _ in echoes]
            async for i, item in items(pump, len(requests)):
                if isinstance(item, BaseException):
                    yield sse_error(item)
                    break
                absorb(choices[i], item)
                text = item.reasoning + item.content
                lp = (_completion_logprobs(tokenizer, item.logprobs, offsets[i])
                      if want_lp and item.logprobs else None)
                offsets[i] += len(text)
                ids = {"token_ids": item.token_ids} if want_ids else {}
                if text or lp or item.finish_reason is not None or item.token_ids and ids:
                    yield chunk(cid, model, pump.created, [{"index": i, "text": text, "logprobs": lp,
                                                            "finish_reason": item.finish_reason, **ids}],
                                obj="text_completion")
            if include_usage:
                yield chunk(cid, model, pump.created, [], obj="text_completion",
                            usage=_usage(prompt_tokens, choices, reasoning=False))
            yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
