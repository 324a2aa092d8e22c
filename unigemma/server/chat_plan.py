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
    make = None
    if tools and choice == "none":
        tools = None
    elif tools and choice is not None and choice != "auto":
        forced = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice.function.name]
        if not forced:
            raise InputError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        make = lambda: grammars.tool_call(forced)  # noqa: E731
    elif choice not in (None, "auto", "none") and not tools:
        raise InputError("tool_choice needs tools")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if make is not None:
            raise InputError("response_format and a forced tool_choice cannot both constrain the reply")
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InputError("response_format json_schema needs a json_schema object")
            schema = fmt.json_schema.schema_
            make = lambda: grammars.json_schema(schema)  # noqa: E731
        else:
            make = grammars.json_object
    constraints = [make() if make else None for _ in range(body.n)]
    # a constrained reply starts at once: thinking would put free text before it
    enable_thinking = convert.thinking(body) and make is None
    inputs = processor(body.image_budget or 280)(messages, tools=tools, enable_thinking=enable_thinking)
    return inputs, constraints
