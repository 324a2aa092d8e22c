"""A chat request -> model inputs and one grammar per choice: what /v1/chat/completions and
/v1/responses share. Runs in a worker thread (media decoding and grammar compilation take a
while); every ValueError the client's data raises is a 400 naming where it came from.
"""

from __future__ import annotations

import logging

from ..errors import InputError
from ..generate.grammar import Grammars
from ..inputs import ModelInputs
from . import convert
from .schema import ChatRequest

log = logging.getLogger("unigemma.server")


def tensor(ids: list[int]):
    import torch

    return torch.tensor([ids], dtype=torch.long)


def has_media(body: ChatRequest) -> bool:
    return any(isinstance(m.content, list) and any(p.get("type") != "text" for p in m.content)
               for m in body.messages)


def client_data(where: str, fn, *args):
    """fn(*args) on the client's data: a ValueError or RecursionError it raises (a decoder's,
    the tokenizer's, the chat template's) is the client's input, so a 400 naming `where`."""
    try:
        return fn(*args)
    except InputError:
        raise
    except (ValueError, RecursionError) as e:
        log.warning("%s refused: %s: %s", where, type(e).__name__, e)
        raise InputError(f"{where}: {type(e).__name__}: {str(e)[:200]}") from None


def chat_plan(body: ChatRequest, limits: convert.Limits, grammars: Grammars, processor) -> tuple[ModelInputs, list]:
    """Messages -> model inputs, and one grammar per choice (each keeps its own state) or Nones."""
    return client_data("messages", _plan, body, limits, grammars, processor)


def _plan(body: ChatRequest, limits: convert.Limits, grammars: Grammars, processor) -> tuple[ModelInputs, list]:
    messages = convert.messages(body, limits)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    if choice not in (None, "auto", "none") and not tools:
        raise InputError("tool_choice needs tools")
    if tools and choice == "none":
        tools = None
    callable_ = tools  # the tools the reply may call
    if tools and choice not in (None, "auto", "required"):
        callable_ = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not callable_:
            raise InputError(f"tool_choice names {choice.function.name!r}, which is not in tools")
    forced = bool(tools) and choice not in (None, "auto")
    parallel = body.parallel_tool_calls is not False
    fmt = body.response_format
    schema = None  # response_format's JSON schema, {"type": "object"} for json_object
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise InputError("response_format json_schema needs a json_schema object")
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
    # a reply constrained from its first token starts at once: thinking would put free text
    # before it; tool_choice "auto" alone leaves text (and thinking) free until a call opens
    enable_thinking = convert.thinking(body) and (schema is None and not forced)
    if callable_ and schema is not None:
        first = grammars.tool_or_json(callable_, schema, parallel)
    elif callable_ and forced:
        first = grammars.tool_call(callable_, parallel)
    elif callable_:
        first = grammars.tool_or_text(callable_, parallel, thinking=enable_thinking)
    elif schema is not None:
        first = grammars.json_schema(schema)
    else:
        first = None
    # one compiled grammar, copied per choice (each copy keeps its own state)
    constraints = [first] + [first.copy() if first else None for _ in range(body.n - 1)]
    inputs = processor(body.image_budget)(messages, tools=tools, enable_thinking=enable_thinking)
    return inputs, constraints
