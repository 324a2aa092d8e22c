"""What every generating route does with its running scheduler requests, whatever it answers
with (chat, completions, responses): pump their deltas onto the event loop while watching the
connection (a client that goes away cancels them), collect or iterate the deltas, count how the
reply ended in /metrics, and turn a failure into an OpenAI error object. Response bodies are
built by the routes' own modules (`respond.py`, `responses.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import InputError
from .limits import Closing
from .schema import error_body
from .sse import END, Pump, usage

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
    pump = Pump(requests, asyncio.get_running_loop())
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
    """A failed request's HTTP status and error object (the details of a 500 go to the log only)."""
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
        self.cached = 0  # prompt tokens reused from the cache (from the last delta's timings)
        self.drafted = self.accepted = 0  # speculative decoding (from the last delta's timings)


def total_usage(prompt_tokens: int, choices: list[Choice], reasoning: bool = True) -> dict:
    return usage(prompt_tokens, sum(c.tokens for c in choices),
                 sum(c.reasoning_tokens for c in choices) if reasoning else None,
                 sum(c.drafted for c in choices), sum(c.accepted for c in choices))


def absorb(c: Choice, delta) -> None:
    c.tokens += len(delta.token_ids)
    if delta.reasoning:
        c.reasoning_tokens += len(delta.token_ids)
    c.content.append(delta.content)
    c.reasoning.append(delta.reasoning)
    c.calls += delta.tool_calls
    c.logprobs += delta.logprobs
    if delta.finish_reason is not None:
        c.finish = delta.finish_reason
    if delta.timings is not None:
        c.cached = delta.timings.cached_tokens
        c.drafted, c.accepted = delta.timings.drafted, delta.timings.accepted


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
        yield i, item


async def collect(request: Request, requests: list, meter):
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
