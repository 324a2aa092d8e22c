"""POST /tokenize and POST /detokenize, in llama-server's and vLLM's shapes.

    {"content": "text", "add_special": false, "with_pieces": false}  -> {"tokens": [...], "count", "max_model_len"}
    {"prompt": "text"}  (vLLM; add_special_tokens, default true)     -> the same
    {"messages": [...]} (vLLM: the chat template applied, as a chat request renders it)
    {"tokens": [ids]}   -> {"content": "text", "prompt": "text"}     (ids checked against the vocabulary)

with_pieces: each token as {"id", "piece"} (the piece as text, or its bytes when they are not
valid UTF-8, as llama-server does). Behind the API key; the text is at most MAX_CHARS characters
and the ids MAX_IDS (the body limit applies as well); the work runs off the event loop.
"""

from __future__ import annotations

from typing import Optional

from fastapi import Depends, FastAPI
from pydantic import Field, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from .chat_plan import client_data
from .schema import ChatRequest, Message, Strict

MAX_CHARS = 1 << 22
MAX_IDS = 1 << 20


class TokenizeRequest(Strict):
    model: Optional[str] = None
    content: Optional[str] = Field(default=None, max_length=MAX_CHARS)
    prompt: Optional[str] = Field(default=None, max_length=MAX_CHARS)
    messages: Optional[list[Message]] = Field(default=None, min_length=1)
    add_special: Optional[bool] = None  # llama-server's name (default false)
    add_special_tokens: Optional[bool] = None  # vLLM's (default true)
    with_pieces: bool = False


class DetokenizeRequest(Strict):
    model: Optional[str] = None
    tokens: list[StrictInt] = Field(max_length=MAX_IDS)


def _piece(tokenizer, i: int):
    b = tokenizer.token_bytes(i)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return list(b)


def register(app: FastAPI) -> None:
    served = app.state.served
    tokenizer = served.gemma.tokenizer
    vocab = min(tokenizer.vocab_size, served.gemma.config.text.vocab_size)

    @app.post("/tokenize", dependencies=[Depends(served.auth)])
    async def tokenize(body: TokenizeRequest):
        served.check_model(body.model)
        given = [k for k in ("content", "prompt", "messages") if getattr(body, k) is not None]
        if len(given) != 1:
            raise InputError("content: send one of content, prompt or messages")
        if body.messages is not None:
            try:  # the messages were validated as such already; this only wraps them
                chat = ChatRequest(messages=[m.model_dump(exclude_none=True) for m in body.messages])
            except ValidationError as e:
                raise InputError(f"messages: {e.errors()[0].get('msg', 'invalid')}") from None
            inputs, _ = await served.plan(chat)
            ids = inputs["input_ids"][0].tolist()
        else:
            text = body.content if body.content is not None else body.prompt
            special = body.add_special if body.add_special is not None else body.add_special_tokens
            if special is None:
                special = body.prompt is not None  # each server's default
            ids = await run_in_threadpool(client_data, given[0], tokenizer.encode, text, special)
        tokens = [{"id": i, "piece": _piece(tokenizer, i)} for i in ids] if body.with_pieces else ids
        return {"tokens": tokens, "count": len(ids), "max_model_len": served.scheduler.max_len}

    @app.post("/detokenize", dependencies=[Depends(served.auth)])
    async def detokenize(body: DetokenizeRequest):
        served.check_model(body.model)
        bad = next((i for i in body.tokens if not 0 <= i < vocab), None)
        if bad is not None:
            raise InputError(f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        text = await run_in_threadpool(tokenizer.decode, body.tokens)
        return {"content": text, "prompt": text}
