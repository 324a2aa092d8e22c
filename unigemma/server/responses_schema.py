"""The /v1/responses request (OpenAI's Responses API): its body model, and its conversion into the
`ChatRequest` that the chat path plans and runs (`chat_plan.py`).

Input items become chat messages: `message` items (user / system / developer / assistant; text,
`input_image` as a data: or http(s) URL, `input_audio`), `function_call` items (assistant tool
calls), `function_call_output` items (tool messages named after their call) and `reasoning`
items (folded into the next assistant message). `instructions` is a system message first.
What this server cannot do (hosted tools, files, file ids, item references, background runs,
stored prompts, truncation) is a 400 naming the field, never silently dropped.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InputError
from .guard import check_tree
from .schema import ChatRequest, Strict

# include values that mean something here; the rest name hosted tools and OpenAI's storage
INCLUDABLE = ("message.output_text.logprobs",
              "reasoning.encrypted_content",  # reasoning items come back whole (plain text), so they round-trip
              "message.input_image.image_url")  # inputs are kept as sent
EFFORTS = {"none": "none", "minimal": "minimal", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}


class FieldError(InputError):
    """Client input that is wrong at `param` (the app answers 400 with that param)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(default=None, max_length=64)
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class TextConfig(_Body):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None  # a hint: accepted, no effect


class ReasoningConfig(_Body):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None
    generate_summary: Optional[Literal["auto", "concise", "detailed"]] = None  # the older name of summary


class ResponsesRequest(Strict):
    # Strict: an undeclared top-level field is a 400 naming it (bookkeeping ones aside: schema.HARMLESS),
    # and no surrogates or deep nests (the app makes each a 400)

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = Field(default=None, max_length=128)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    max_tool_calls: Optional[int] = Field(default=None, ge=0)  # counts hosted tool calls: none here
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    include: Optional[list[str]] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None  # include_obfuscation: there is none to turn off
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None  # hints for OpenAI's caches: accepted, no effect
    prompt_cache_retention: Optional[str] = None
    service_tier: Optional[str] = None
    # OpenAI features this server does not have: a 400 when set
    background: Optional[bool] = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None
    # extensions, as on /v1/chat/completions
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    top_k: Optional[int] = Field(default=None, ge=0, le=2**31 - 1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):  # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return v

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ()) or bool(self.top_logprobs)

    @property
    def wants_summary(self) -> bool:
        return self.reasoning is not None and (self.reasoning.summary or self.reasoning.generate_summary) is not None


_SAMPLING = ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "logit_bias")


def check_supported(body: ResponsesRequest) -> None:
    for name in ("conversation", "prompt", "context_management", "moderation"):
        if getattr(body, name) is not None:
            raise FieldError(name, "not supported by this server")
    if body.background:
        raise FieldError("background", "background responses are not supported; use stream: true")
    if body.truncation == "auto":
        raise FieldError("truncation", "'auto' is not supported (input items are never dropped; a prompt over "
                                       "the context is a 400); send 'disabled'")
    for i, name in enumerate(body.include or ()):
        if name not in INCLUDABLE:
            raise FieldError(f"include[{i}]", f"{name!r} is not supported (only {', '.join(INCLUDABLE)})")


def to_chat(body: ResponsesRequest, history: list[dict]) -> tuple[ChatRequest, list]:
    """(the chat request to run, the conversation without instructions: history + this input).
    `history` is the stored conversation of previous_response_id (chat messages), or []."""
    check_supported(body)
    conversation = history + _messages(body.input, _call_names(history))
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    chat: dict[str, Any] = {"messages": messages, "logprobs": body.wants_logprobs,
                            "max_tokens": body.max_output_tokens}
    if body.top_logprobs:
        chat["top_logprobs"] = body.top_logprobs
    chat.update({k: getattr(body, k) for k in _SAMPLING if getattr(body, k) is not None})
    if body.tools:
        chat["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    if body.parallel_tool_calls is not None:
        chat["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise FieldError("text.format.schema", "a json_schema format needs a schema")
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    if body.reasoning is not None and body.reasoning.effort is not None:
        chat["reasoning_effort"] = EFFORTS[body.reasoning.effort]
    try:
        return ChatRequest.model_validate(chat), conversation
    except ValidationError as e:  # what the chat schema refuses (a tool name over 64 characters, ...)
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        head = where.split(".", 1)[0]
        raise FieldError("input" if head in ("", "messages") else head, f"{where}: {first.get('msg', 'invalid')}") \
            from None


def _call_names(messages: list[dict]) -> dict[str, str]:
    """call_id -> function name, over the assistant tool calls in `messages`."""
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}


def _tool(tool: dict, where: str) -> dict:
    kind = tool.get("type")
    if kind != "function":
        raise FieldError(f"{where}.type", f"tool type {kind!r} is not supported (function tools only)")
    if not isinstance(tool.get("name"), str):
        raise FieldError(f"{where}.name", "a function tool needs a name")
    if not isinstance(tool.get("parameters", {}) or {}, dict):
        raise FieldError(f"{where}.parameters", "must be a JSON schema object")
    fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _tool_choice(choice) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") in ("none", "auto", "required"):  # an older spelling: {"type": "auto"}
        return choice["type"]
    raise FieldError("tool_choice", f"{choice.get('type')!r} is not supported (none, auto, required or "
                                    "{'type': 'function', 'name': ...})")


def _messages(items: str | list[dict], names: dict[str, str]) -> list[dict]:
    """Input items -> chat messages; `names` (call_id -> function name) grows with the calls seen."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise FieldError("input", "needs at least one item")
    out: list[dict] = []
    reasoning: list[str] = []  # reasoning items wait for the assistant turn they belong to

    def new_assistant(content) -> dict:  # a new assistant turn, holding the reasoning before it
        out.append({"role": "assistant", "content": content})
        if reasoning:
            out[-1]["reasoning_content"] = "\n".join(reasoning)
            reasoning.clear()
        return out[-1]

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else "item_reference")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise FieldError(f"{where}.role", f"{role!r} is not user, system, developer or assistant")
            content = _content(item.get("content"), f"{where}.content", role == "assistant")
            if role == "assistant":
                new_assistant(content)
            else:
                out.append({"role": role, "content": content})
        elif kind == "function_call":
            name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, str):
                raise FieldError(where, "a function_call needs name, call_id and arguments (JSON text) strings")
            try:
                parsed = json.loads(args or "{}")
            except (ValueError, RecursionError):
                raise FieldError(f"{where}.arguments", "not JSON (or nested too deep)") from None
            if not isinstance(parsed, dict):
                raise FieldError(f"{where}.arguments", "must be a JSON object")
            if (bad := check_tree(parsed, f"{where}.arguments")) is not None:  # escapes can spell a surrogate
                raise FieldError(bad[0], bad[1])
            # calls join the assistant turn they follow (its text, the calls before them)
            m = out[-1] if out and out[-1]["role"] == "assistant" and not reasoning else new_assistant(None)
            m.setdefault("tool_calls", []).append({"id": call_id, "type": "function",
                                                   "function": {"name": name, "arguments": parsed}})
            names[call_id] = name
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise FieldError(f"{where}.call_id", f"no function_call with call_id {call_id!r} in this "
                                                     "conversation")
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output, f"{where}.output", False)
            out.append({"role": "tool", "tool_call_id": call_id, "name": names[call_id], "content": content})
        elif kind == "reasoning":
            # the thought itself when it came back whole, else its summary
            parts = next((item[k] for k in ("content", "summary") if isinstance(item.get(k), list) and item[k]), [])
            reasoning += [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
        elif kind == "item_reference":
            raise FieldError(where, "item references are not supported; send the item, or use previous_response_id")
        else:
            raise FieldError(f"{where}.type", f"input item type {kind!r} is not supported (message, function_call, "
                                              "function_call_output, reasoning)")
    return out


def _content(content, where: str, assistant: bool) -> str | list[dict]:
    """A message's content -> the chat path's: a string, or text / image_url / input_audio parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, "must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and assistant and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and not assistant:
            if part.get("file_id") is not None or not isinstance(part.get("image_url"), str):
                raise FieldError(at, "input_image needs an image_url (a data: URL, or http(s) when the server "
                                     "fetches URLs); file_id is not supported")
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_audio" and not assistant:
            spec = part.get("input_audio")
            if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
                raise FieldError(at, "input_audio needs {'data': <base64>, 'format': 'wav' | 'mp3'}")
            parts.append({"type": "input_audio", "input_audio": {"data": spec["data"], "format": spec.get("format")}})
        elif kind == "input_file":
            raise FieldError(at, "input_file is not supported (send text, input_image or input_audio)")
        else:
            raise FieldError(at, f"content part type {kind!r} is not supported here")
    if assistant:  # the chat template takes an assistant turn's text as one string
        return "".join(p["text"] for p in parts)
    return parts
