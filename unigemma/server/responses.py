"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}.

A Responses request becomes a chat request (`responses_schema.to_chat`) and runs the chat path:
`Served.plan` / `Served.submit`, then respond.py's pump, so a client that goes away cancels and
/metrics counts the reply as for chat. The reply's deltas become output items in order: a `reasoning` item (the thought channel), a `message` with one `output_text`
part, a `function_call` item per call; a new item starts whenever the kind changes. Streaming
sends OpenAI's event sequence (`response.created`, `response.in_progress`, per item
`output_item.added` ... `output_item.done`, then `response.completed` or `response.incomplete`,
or `response.failed`), each with a `sequence_number` and an SSE `event:` line. Answered
responses are kept (unless `store: false`) in a bounded in-memory store, oldest evicted, so
`previous_response_id` continues a conversation.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from . import convert, respond
from .responses_schema import FieldError, ResponsesRequest, to_chat
from .schema import ApiError

log = logging.getLogger("unigemma.server")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Store:
    """Answered responses by id, with the conversation that led to them (chat messages), for
    `previous_response_id` and GET; at most `max_entries` and about `max_bytes` (their JSON),
    oldest evicted first."""

    def __init__(self, max_entries: int = 1024, max_bytes: int = 64 << 20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, tuple[dict, list, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: list) -> None:
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        with self._lock:
            if size > self.max_bytes:
                log.warning("response %s (%d bytes) is larger than the store; not kept", response["id"], size)
                return
            self._entries[response["id"]] = (response, conversation, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][2]

    def get(self, rid: str) -> tuple[dict, list] | None:
        with self._lock:
            entry = self._entries.get(rid)
        return None if entry is None else entry[:2]

    def delete(self, rid: str) -> bool:
        with self._lock:
            entry = self._entries.pop(rid, None)
            if entry is not None:
                self._bytes -= entry[2]
        return entry is not None

    def __len__(self) -> int:
        return len(self._entries)


class Output:
    """The response's output items, built from the reply's deltas; `feed` and `finish` also
    return the stream events (without sequence numbers) that announce them."""

    def __init__(self, tokenizer, logprobs: bool, summary: bool):
        self.tokenizer, self.logprobs, self.summary = tokenizer, logprobs, summary
        self.items: list[dict] = []
        self.open: str | None = None  # "reasoning" or "message": the item still growing (the last one)
        self.text, self.lps = "", []

    def feed(self, delta) -> list[dict]:
        events = []
        if delta.reasoning:
            events += self._grow("reasoning", delta.reasoning, [])
        if delta.content:
            lps = convert.logprobs_chat(self.tokenizer, delta.logprobs) if self.logprobs else []
            events += self._grow("message", delta.content, lps)
        for call in convert.openai_tool_calls(delta.tool_calls):
            events += self._close("completed")
            fn = call["function"]
            item = {"id": _id("fc"), "type": "function_call", "call_id": call["id"], "name": fn["name"],
                    "arguments": fn["arguments"], "status": "completed"}
            self.items.append(item)
            at = {"item_id": item["id"], "output_index": len(self.items) - 1}
            events += [{"type": "response.output_item.added", "output_index": at["output_index"],
                        "item": {**item, "arguments": "", "status": "in_progress"}},
                       {"type": "response.function_call_arguments.delta", **at, "delta": item["arguments"]},
                       {"type": "response.function_call_arguments.done", **at, "name": item["name"],
                        "arguments": item["arguments"]},
                       {"type": "response.output_item.done", "output_index": at["output_index"], "item": item}]
        return events

    def finish(self, status: str) -> list[dict]:
        return self._close(status)

    def _grow(self, kind: str, text: str, lps: list) -> list[dict]:
        events = []
        if self.open != kind:
            events += self._close("completed")
            if kind == "reasoning":
                item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
                part = {"type": "reasoning_text", "text": ""}
            else:
                item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.items.append(item)
            self.open, self.text, self.lps = kind, "", []
            events += [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(item)},
                       {"type": "response.content_part.added", **self._at(), "part": part}]
        self.text += text
        self.lps += lps
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": lps}
        return events + [{"type": name, **self._at(), "delta": text, **extra}]

    def _at(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, "content_index": 0}

    def _close(self, status: str) -> list[dict]:
        """End the open reasoning or message item (`status`: completed or incomplete)."""
        if self.open is None:
            return []
        kind, item, at = self.open, self.items[-1], self._at()
        self.open = None
        item["status"] = status
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": self.text}
            item["content"] = [part]
            events = [{"type": "response.reasoning_text.done", **at, "text": self.text},
                      {"type": "response.content_part.done", **at, "part": part}]
            if self.summary:  # no separate summarizer: the thought itself is the summary asked for
                summary = {"type": "summary_text", "text": self.text}
                item["summary"] = [summary]
                s = {"item_id": at["item_id"], "output_index": at["output_index"], "summary_index": 0}
                events += [{"type": "response.reasoning_summary_part.added", **s, "part": {**summary, "text": ""}},
                           {"type": "response.reasoning_summary_text.delta", **s, "delta": self.text},
                           {"type": "response.reasoning_summary_text.done", **s, "text": self.text},
                           {"type": "response.reasoning_summary_part.done", **s, "part": summary}]
        else:
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.lps}
            item["content"] = [part]
            events = [{"type": "response.output_text.done", **at, "text": self.text, "logprobs": self.lps},
                      {"type": "response.content_part.done", **at, "part": part}]
        return events + [{"type": "response.output_item.done", "output_index": at["output_index"], "item": item}]


def _as_messages(output: list[dict]) -> list[dict]:
    """Output items -> the chat messages a follow-up sees (one assistant turn)."""
    turn: dict = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "reasoning":
            turn["reasoning_content"] = item["content"][0]["text"]
        elif item["type"] == "message":
            turn["content"] = (turn["content"] or "") + item["content"][0]["text"]
        else:
            turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": json.loads(item["arguments"])}})
    return [turn]


class _Reply:
    """One response being answered: the request's echo fields and the output as it grows."""

    def __init__(self, body: ResponsesRequest, served, params, prompt_tokens: int):
        self.body, self.rid, self.model = body, _id("resp"), served.check_model(body.model)  # names.py
        self.params, self.prompt_tokens = params, prompt_tokens
        self.choice, self.cached = respond.Choice(), 0
        self.output = Output(served.gemma.tokenizer, body.wants_logprobs, body.wants_summary)

    def feed(self, delta) -> list[dict]:
        respond.absorb(self.choice, delta)
        if delta.timings is not None:
            self.cached = delta.timings.cached_tokens
        return self.output.feed(delta)

    @property
    def status(self) -> str:
        finish = self.choice.finish
        return "incomplete" if finish == "length" else "cancelled" if finish == "cancelled" else "completed"

    def finish(self) -> list[dict]:
        return self.output.finish("incomplete" if self.status == "incomplete" else "completed")

    def response(self, created: int, status: str, error: dict | None = None) -> dict:
        b, c, done = self.body, self.choice, status not in ("in_progress", "failed")
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else None
        return {
            "id": self.rid, "object": "response", "created_at": created, "status": status, "model": self.model,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "output": self.output.items if done else [],
            "tools": b.tools or [], "tool_choice": b.tool_choice or "auto",
            "parallel_tool_calls": True if b.parallel_tool_calls is None else b.parallel_tool_calls,
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "max_output_tokens": self.params.max_tokens, "max_tool_calls": b.max_tool_calls,
            "previous_response_id": b.previous_response_id,
            "reasoning": b.reasoning.model_dump(exclude_none=True) if b.reasoning else None,
            "text": {"format": fmt or {"type": "text"}}, "top_logprobs": b.top_logprobs or 0,
            "truncation": "disabled", "store": b.store is not False, "metadata": b.metadata or {},
            "user": b.user, "background": False, "service_tier": "default",
            "usage": None if not done else {
                "input_tokens": self.prompt_tokens, "output_tokens": c.tokens,
                "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": c.reasoning_tokens},
                "total_tokens": self.prompt_tokens + c.tokens},
        }


def _event(seq, event: dict) -> bytes:
    event["sequence_number"] = next(seq)
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def register(app: FastAPI, store: Store | None = None) -> None:
    served = app.state.served
    store = app.state.responses = store or Store()
    gemma, config = served.gemma, served.config

    @app.post("/v1/responses", dependencies=[Depends(served.auth)])
    async def create(body: ResponsesRequest, request: Request):
        model = served.check_model(body.model)
        history = []
        if body.previous_response_id is not None:
            found = store.get(body.previous_response_id)
            if found is None:
                raise ApiError(400, f"previous response {body.previous_response_id!r} not found (unknown, "
                                    "evicted or not stored)", param="previous_response_id",
                               code="previous_response_not_found")
            history = found[1]
        try:
            chat, conversation = to_chat(body, history)
        except FieldError as e:
            raise ApiError(400, str(e), param=e.param) from None
        params = convert.params(chat, gemma.default_params, 0, config.max_tokens_default)
        try:
            inputs, constraints = await served.plan(chat)
            requests = served.submit(inputs, [params], constraints, model)
        except InputError as e:  # the chat path names its messages: they are this request's input
            if not str(e).startswith("messages"):
                raise
            raise ApiError(400, f"input (as chat messages, instructions first): {e}", param="input") from None
        except ApiError as e:
            if e.body["error"]["param"] == "messages":  # a prompt longer than the context
                e.body["error"]["param"] = "input"
            raise
        reply = _Reply(body, served, params, requests[0].prompt_tokens)

        async def kept(created: int) -> dict:
            response = reply.response(created, reply.status)
            if body.store is not False and reply.status != "cancelled":
                # measuring it serialises the whole conversation (media too): off the event loop
                await run_in_threadpool(store.put, response, conversation + _as_messages(reply.output.items))
            return response

        if not body.stream:
            async with respond.pumping(request, requests, served.meter) as pump:
                async for _, item in respond.items(pump, 1):
                    if isinstance(item, BaseException):
                        status, err = respond.failure(item)
                        return JSONResponse(err, status_code=status)
                    reply.feed(item)
            reply.finish()
            return await kept(pump.created)

        async def events():
            seq = itertools.count()
            async with respond.pumping(request, requests, served.meter) as pump:
                start = reply.response(pump.created, "in_progress")
                yield _event(seq, {"type": "response.created", "response": start})
                yield _event(seq, {"type": "response.in_progress", "response": start})
                async for _, item in respond.items(pump, 1):
                    if isinstance(item, BaseException):
                        status, err = respond.failure(item)
                        code = "invalid_prompt" if status == 400 else "server_error"
                        failed = reply.response(pump.created, "failed", {"code": code,
                                                                        "message": err["error"]["message"]})
                        yield _event(seq, {"type": "response.failed", "response": failed})
                        return
                    for event in reply.feed(item):
                        yield _event(seq, event)
                for event in reply.finish():
                    yield _event(seq, event)
                final = await kept(pump.created)
                kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
                    final["status"], "response.failed")
                yield _event(seq, {"type": kind, "response": final})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/responses/{rid}", dependencies=[Depends(served.auth)])
    async def retrieve(rid: str):
        found = store.get(rid)
        if found is None:
            raise ApiError(404, f"response {rid!r} not found", "not_found_error", param="response_id")
        return found[0]

    @app.delete("/v1/responses/{rid}", dependencies=[Depends(served.auth)])
    async def delete(rid: str):
        if not store.delete(rid):
            raise ApiError(404, f"response {rid!r} not found", "not_found_error", param="response_id")
        return {"id": rid, "object": "response", "deleted": True}
