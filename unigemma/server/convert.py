"""OpenAI request bodies -> our messages, SamplingParams and grammar; our deltas -> OpenAI pieces.

Message parts accepted (besides text):
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "https://..."}}
  {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav" | "mp3" | ...}}
  {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..." | "https://..."}}  (extension)
http(s) URLs are fetched only when the server was started with --allow-url-fetch (fetch.py).
Every problem raises InputError naming the message and part; the app answers 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

from ..errors import InputError
from ..generate.params import SamplingParams
from .fetch import fetch
from .guard import check_tree
from .schema import ChatRequest, CompletionRequest

_DATA_KINDS = {"image_url": "image", "video_url": "video"}


@dataclass
class Limits:
    max_media_bytes: int = 20 << 20  # one decoded image / audio / video
    allow_url_fetch: bool = False
    fetch_timeout: float = 10.0


def _b64(data: str, where: str, limits: Limits) -> bytes:
    if len(data) * 3 // 4 > limits.max_media_bytes:
        raise InputError(f"{where}: larger than {limits.max_media_bytes} bytes")
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: not valid base64") from None
    if not out:
        raise InputError(f"{where}: empty")
    return out


def _url_bytes(url, where: str, limits: Limits) -> bytes:
    if not isinstance(url, str) or not url:
        raise InputError(f"{where}: url must be a non-empty string")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise InputError(f"{where}: a data: URL must be base64 ('data:<type>;base64,<data>')")
        return _b64(data, where, limits)
    if url.startswith(("http://", "https://")):
        if not limits.allow_url_fetch:
            raise InputError(f"{where}: http(s) URLs are not fetched (start the server with --allow-url-fetch); "
                             "send the file as a data: URL")
        try:
            return fetch(url, max_bytes=limits.max_media_bytes, timeout=limits.fetch_timeout)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    raise InputError(f"{where}: url must be a data: URL or http(s), got {url[:40]!r}")


def _part(part, where: str, limits: Limits) -> dict:
    if not isinstance(part, dict):
        raise InputError(f"{where}: a part must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InputError(f"{where}: text part needs a 'text' string")
        return {"type": "text", "text": part["text"]}
    if kind in _DATA_KINDS:
        spec = part.get(kind)
        url = spec.get("url") if isinstance(spec, dict) else spec
        media = _DATA_KINDS[kind]
        return {"type": media, media: _url_bytes(url, f"{where} ({kind})", limits)}
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise InputError(f"{where}: input_audio needs {{'data': <base64>, 'format': ...}}")
        return {"type": "audio", "audio": _b64(spec["data"], f"{where} (input_audio)", limits)}
    raise InputError(f"{where}: unknown part type {kind!r} (text, image_url, input_audio or video_url)")


def messages(body: ChatRequest, limits: Limits) -> list[dict]:
    """The conversation with media parts decoded to bytes (or fetched)."""
    out = []
    for i, m in enumerate(body.messages):
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        if isinstance(d.get("content"), list):
            d["content"] = [_part(p, f"messages[{i}].content[{j}]", limits) for j, p in enumerate(d["content"])]
        for j, call in enumerate(d.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):  # OpenAI sends JSON text
                where = f"messages[{i}].tool_calls[{j}].function.arguments"
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except (ValueError, RecursionError):
                    raise InputError(f"{where} is not JSON (or is nested too deep)") from None
                # the text's escapes can spell a surrogate or a deep nest the body check never saw
                if (bad := check_tree(fn["arguments"], where)) is not None:
                    raise InputError(f"{bad[0]}: {bad[1]}")
        out.append(d)
    return out


def thinking(body: ChatRequest) -> bool:
    kwargs = body.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise InputError("chat_template_kwargs.enable_thinking must be true or false")
        return kwargs["enable_thinking"]
    return body.reasoning_effort in ("low", "medium", "high")


def params(body: ChatRequest | CompletionRequest, defaults: SamplingParams, index: int = 0,
           max_tokens_cap: int | None = None) -> SamplingParams:
    """SamplingParams for choice `index` (n > 1: seed + index, so choices differ but repeat)."""
    kw = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens"):
        v = getattr(body, name)
        if v is not None:
            kw[name] = v
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is not None:
        kw["max_tokens"] = limit
    elif max_tokens_cap is not None:
        kw["max_tokens"] = min(defaults.max_tokens, max_tokens_cap)
    if body.ignore_eos:
        kw["ignore_eos"] = True
    if body.seed is not None:
        kw["seed"] = (body.seed + index) % 2**63
    if body.logit_bias:
        kw["logit_bias"] = body.logit_bias
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        if len(stops) > 4 or any(not s for s in stops):
            raise InputError("stop: up to 4 non-empty strings")
        kw["stop"] = tuple(stops)
    if isinstance(body, ChatRequest):
        kw["logprobs"] = body.logprobs
        kw["top_logprobs"] = body.top_logprobs or 0
        if body.top_logprobs and not body.logprobs:
            raise InputError("top_logprobs needs logprobs: true")
    elif body.logprobs is not None:
        kw["logprobs"], kw["top_logprobs"] = True, body.logprobs
    fields = {f: getattr(defaults, f) for f in defaults.__dataclass_fields__}
    return SamplingParams(**{**fields, **kw})


def finite(lp: float) -> float:
    """JSON has no -inf or NaN: a token the request's masks or penalties ruled out (a grammar
    allowing two tokens among top_logprobs=5, a penalty that overflowed) gets OpenAI's -9999."""
    return lp if math.isfinite(lp) else -9999.0


def logprobs_chat(tokenizer, entries: list[dict]) -> list[dict]:
    """Our per-token logprob dicts -> OpenAI chat `logprobs.content` items."""
    def item(tid, lp):
        b = tokenizer.token_bytes(tid)
        return {"token": b.decode("utf-8", "replace"), "logprob": finite(lp), "bytes": list(b)}
    return [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
            for e in entries]


def openai_tool_calls(calls: list[dict], start: int = 0) -> list[dict]:
    """Our parsed calls (arguments as objects) -> OpenAI's (arguments as JSON text, with an index)."""
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function", {})
        args = fn.get("arguments", {})
        out.append({"index": start + i, "id": c.get("id") or f"call_{start + i}", "type": "function",
                    "function": {"name": fn.get("name", ""),
                                 "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out
