"""OpenAI request bodies as pydantic models: what FastAPI validates and the OpenAPI document shows.

Field-level checks live here (types, ranges, enums); what needs the model or the tokenizer
(media, the prompt's length, grammars) is checked in `convert.py`. A top-level field that is not
implemented is refused (`Strict`: 400 "unsupported field 'x'"), never silently ignored, except the
few that clients send as a matter of course and that change nothing here (`HARMLESS`). Inside
nested objects (messages, tools) unknown keys are ignored: clients echo back assistant messages
with fields such as `refusal` or `annotations`. Every string in the body must be valid Unicode and
no part may nest deeper than `guard.MAX_DEPTH` (checked once over the raw body, before the
fields). Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from .guard import check_tree

MAX_N = 8  # choices per request: each is one more request through the batcher


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _any(_value) -> bool:
    return True


# SGLang's router (sglang-router, docs/scaling) re-serialises every request with its own
# extensions set to their defaults; those defaults are what this server does anyway (stop
# strings trimmed, special tokens skipped, thinking parsed into reasoning_content and
# streamed), so only those values pass: asking for anything else is still a 400.
ROUTER_DEFAULTS: dict[str, Callable[[Any], bool]] = {
    "no_stop_trim": lambda v: v is False, "continue_final_message": lambda v: v is False,
    "skip_special_tokens": lambda v: v is True, "separate_reasoning": lambda v: v is True,
    "stream_reasoning": lambda v: v is True, "return_hidden_states": lambda v: v is False,
}

# Top-level fields accepted and not acted on, because they change nothing a local server does:
# bookkeeping (user, metadata, safety_identifier), OpenAI's hosted-service knobs (store,
# service_tier, prompt caching: this server has no stored completions, tiers or cross-request
# cache), llama-server's `cache_prompt` hint. Each maps to a check of its value: `modalities`
# asking for audio out, or `best_of` above 1, is a feature this server lacks, so a 400.
HARMLESS: dict[str, Callable[[Any], bool]] = {
    "metadata": _any, "store": _any, "service_tier": _any, "safety_identifier": _any,
    "prompt_cache_key": _any, "prompt_cache_retention": _any, "prompt_cache_options": _any, "cache_prompt": _any,
    "modalities": lambda v: v is None or v == ["text"], **ROUTER_DEFAULTS,
}


class Strict(_Body):
    """A request body that refuses fields it does not implement: 400 "unsupported field 'x'"
    with param x (the app turns the `unsupported_field` error into it). `harmless` lists the
    unimplemented fields accepted anyway, each with a check of its value; a subclass (another
    endpoint) may widen or narrow it. Its strings must be valid Unicode and it may not nest too
    deep (400 naming the path: `unsound_body`)."""

    model_config = ConfigDict(extra="allow")
    harmless: ClassVar[dict[str, Callable[[Any], bool]]] = HARMLESS

    @model_validator(mode="before")
    @classmethod
    def _sound_text(cls, data):
        # a surrogate would reach the tokenizer (a TypeError, once a 500), a deep nest the chat
        # template's recursion; the app turns this error into a 400 whose param is the path
        if (bad := check_tree(data)) is not None:
            raise PydanticCustomError("unsound_body", "{where}: {why}", {"where": bad[0], "why": bad[1]})
        return data

    @model_validator(mode="after")
    def _no_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            ok = self.harmless.get(name)
            if ok is None or not ok(value):
                why = ("this server does not implement it" if ok is None
                       else f"this server does not support the value {value!r}")
                raise PydanticCustomError("unsupported_field", "unsupported field '{where}': {why}",
                                          {"where": name, "why": why[:120]})
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class Function(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: Function


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # a string, or a list of parts: {"type": "text"|"image_url"|"input_audio"|"video_url", ...}
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class _Sampling(Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0, le=2**31 - 1, description="extension: 0 = off")
    min_p: Optional[float] = Field(default=None, ge=0, le=1, description="extension")
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0, description="extension")
    ignore_eos: bool = Field(default=False, description="extension: end-of-turn does not stop (benchmarks)")
    return_token_ids: bool = Field(default=False, description="extension (vLLM): the prompt's and each "
                                   "choice's token ids in the reply")
    min_tokens: Optional[int] = Field(default=None, ge=0,
                                      description="extension: no end-of-turn before this many tokens")
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    logit_bias: Optional[dict[str, float]] = Field(
        default=None, description="token id -> bias in [-100, 100] added to its logit (at most 300)")
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    # thinking: chat_template_kwargs={"enable_thinking": true} (vLLM / SGLang style) or
    # reasoning_effort (OpenAI style: "none" / "minimal" = off; "low" / "medium" / "high" = on)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    image_budget: Optional[Literal[70, 140, 280, 560, 1120]] = Field(
        default=None, description="extension: soft tokens per image (default: the model's, 280 for Gemma 4)")


class CompletionRequest(_Sampling):
    harmless: ClassVar[dict[str, Callable[[Any], bool]]] = {**HARMLESS, "best_of": lambda v: v in (None, 1)}

    # text, several texts, token ids, or several prompts of token ids
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    # 0 only with echo: scoring a prompt (lm-eval-harness' loglikelihood), no completion
    max_tokens: Optional[int] = Field(default=None, ge=0)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = Field(default=False, description="the prompt before the completion (with logprobs: its tokens' too)")
    suffix: Optional[str] = Field(default=None, description="fill in the middle: needs a vocabulary with FIM tokens")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error a route raises to answer with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)
