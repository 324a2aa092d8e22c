"""Server-sent events and OpenAI response objects: chunk and completion formatting only.

Also `Pump`: the bridge from the scheduler's blocking `Request` iterators (one per choice) to
the event loop. One small thread per request waits on its deltas and hands them to an
asyncio queue; cancelling the pump cancels every request (the scheduler frees their rows at
its next step).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

END = object()  # a request's iterator is exhausted


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, model: str, created: int, choices: list[dict], obj="chat.completion.chunk", usage=None,
          **extra) -> bytes:
    """extra: more top-level fields (vLLM's prompt_token_ids)."""
    body = {"id": cid, "object": obj, "created": created, "model": model, "choices": choices, **extra}
    if usage is not None:
        body["usage"] = usage
    return sse(body)


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
          drafted: int = 0, accepted: int = 0, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object. With speculative decoding (--draft) the drafts the target kept and
    threw away are reported as OpenAI reports predicted-output tokens; prompt tokens restored
    from the prefix cache as OpenAI reports cached ones (prompt_tokens_details, always there)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    details = {}
    if reasoning_tokens is not None:
        details["reasoning_tokens"] = reasoning_tokens
    if drafted:
        details["accepted_prediction_tokens"] = accepted
        details["rejected_prediction_tokens"] = drafted - accepted
    if details:
        out["completion_tokens_details"] = details
    return out


class Pump:
    """Deltas of several scheduler requests as (index, delta | exception | END) on the loop."""

    def __init__(self, requests: list, loop: asyncio.AbstractEventLoop):
        self.requests, self.loop = requests, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = len(requests)
        self.created = int(time.time())
        self.outcome: str | None = None  # set when the reply ends other than "ok" (see limits.Meter)
        for i, r in enumerate(requests):
            threading.Thread(target=self._run, args=(i, r), daemon=True, name=f"unigemma-pump-{r.id}").start()

    def _run(self, i: int, request) -> None:
        try:
            for delta in request:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, delta))
            item = END
        except BaseException as e:  # noqa: BLE001 (a failed prefill: handed to the response)
            item = e
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))
        except RuntimeError:  # the loop closed (server shutting down)
            pass

    async def get(self):
        return await self.queue.get()

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    def abort(self, error: BaseException) -> None:
        """End the reply with `error` (called on the loop), after the few deltas already queued."""
        self.outcome = "cancelled"
        self.cancel()
        self.queue.put_nowait((0, error))
