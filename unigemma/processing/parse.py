r"""Gemma 4 output parsing: thinking vs answer, tool calls, and rendering calls back.

Reads detokenized model text (special tokens kept, stop tokens `<turn|>`,
`<|tool_response>`, `<eos>` already removed by the caller) and splits it into
reasoning, content and OpenAI-style `tool_calls`, either for a whole text
(`parse_output`) or delta by delta (`StreamParser`). The inverse,
`render_tool_call` / `render_tool_response`, writes the exact text the checkpoint's
chat template writes. Knows nothing about tokens, templates or HTTP.

The format, as the template writes it (`format_argument(..., escape_keys=False)`):
  thinking   <|channel>thought\n...<channel|>   (label and one "\n" before the close are framing)
  tool call  <|tool_call>call:NAME{key:VALUE,...}<tool_call|>
  VALUE      <|"|>raw string<|"|> | {k:v,...} | [v,...] | true | false | None | str(number)
Keys are bare and dict keys come case-insensitively sorted (Jinja `dictsort`). Strings are
not escaped, so `<|"|>` (a single special token) cannot be written inside one unambiguously.
Resolution: a `<|"|>` ends a string only when the next character is `,` `}` or `]`, so
strings round-trip unless they contain `<|"|>` directly followed by one of those. Bare keys
round-trip unless they contain one of `{}[],:<>` or have surrounding whitespace (stripped);
function names must avoid `{}[],<>"` and whitespace.
The parser also accepts `null` and `<|"|>`-quoted keys, and reads any other bare word
(`celsius`, `inf`) as a string.

A malformed or unterminated call never raises: its raw text (through the first
`<tool_call|>`, or to the end) is kept in `content` and a `ToolCallError` is reported.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

THOUGHT_OPEN, THOUGHT_CLOSE, THOUGHT_LABEL = "<|channel>", "<channel|>", "thought\n"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
QUOTE = '<|"|>'
MAX_DEPTH = 64  # nesting guard: a runaway "[[[[..." is malformed, not a RecursionError

_WS = " \t\r\n"
_VALUE_END = ",}]"
_BARE_RUN = re.compile(r"[^{}\[\],:<>]*")  # a bare key or scalar stops at any of these
_NAME = re.compile(r"[^{}\[\],<>\s\"]*")
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class ToolCallError:
    """A tool call that could not be parsed; `text` is the raw text, also kept in content."""
    message: str
    text: str


@dataclass
class ParsedOutput:
    """Parse of a whole text, or the increment produced by one `StreamParser` call."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI `tool_calls` entries
    errors: list[ToolCallError] = field(default_factory=list)

    def extend(self, other: ParsedOutput) -> None:
        """Append a later increment (concatenate text, append calls and errors)."""
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        self.errors += other.errors


def _random_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------- rendering

def _dictsort(d: Mapping) -> list:
    # Jinja's dictsort: case-insensitive, stable (so "A" keeps its place before "a").
    return sorted(d.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def render_value(value: Any) -> str:
    """Render one argument value exactly as the template's `format_argument` does."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):  # before numbers: bool is an int in Python
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{render_value(v)}" for k, v in _dictsort(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    return str(value)  # what Jinja prints: 1e-05, -0.0, None


def _as_mapping(arguments: Mapping | str | None) -> Mapping:
    # OpenAI clients send arguments as a JSON string; the template needs the object.
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return arguments or {}


def render_tool_call(name: str, arguments: Mapping | str | None) -> str:
    """`<|tool_call>call:NAME{...}<tool_call|>`, as the template renders an assistant's call."""
    return f"{CALL_OPEN}call:{name}{render_value(_as_mapping(arguments))}{CALL_CLOSE}"


def render_tool_response(name: str, response: Any) -> str:
    """`<|tool_response>response:NAME{...}<tool_response|>`; a non-mapping goes under `value`."""
    if not isinstance(response, Mapping):
        response = {"value": response}
    body = render_value(response)
    return f"{RESPONSE_OPEN}response:{name}{body}{RESPONSE_CLOSE}"


# ---------------------------------------------------------------- value grammar
# Every function reads s from i and returns (value, end). It raises _Incomplete when s ends
# before the value does and _Malformed when no continuation can make it valid. Run on a
# prefix, the result is either _Incomplete or the same as on the whole text; that is what
# lets the stream parser agree with the whole-text parser.

class _Incomplete(Exception):
    pass


class _Malformed(Exception):
    def __init__(self, pos: int, message: str):
        super().__init__(message)
        self.pos, self.message = pos, message


def _partial(s: str, i: int, token: str) -> bool:
    # s ends inside `token` starting at i (the rest may arrive with the next delta)
    return len(s) - i < len(token) and token.startswith(s[i:])


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    if i == len(s):
        raise _Incomplete
    return i


def _string(s: str, i: int, ends: str) -> tuple[str, int]:
    # i is just past the opening quote; the closing one is the first followed by `ends`.
    k = i
    while True:
        q = s.find(QUOTE, k)
        if q < 0 or q + len(QUOTE) >= len(s):
            raise _Incomplete
        if s[q + len(QUOTE)] in ends:
            return s[i:q], q + len(QUOTE)
        k = q + 1


def _bare(s: str, i: int, ends: str) -> tuple[str, int]:
    j = _BARE_RUN.match(s, i).end()
    if j == len(s):
        raise _Incomplete
    if s[j] not in ends:
        raise _Malformed(j, f"unexpected {s[j]!r}")
    return s[i:j].strip(), j


def _scalar(token: str) -> Any:
    if token in ("true", "false"):
        return token == "true"
    if token in ("None", "null"):
        return None
    try:
        if _INT.fullmatch(token):
            return int(token)
        if _FLOAT.fullmatch(token) and math.isfinite(f := float(token)):
            return f
    except ValueError:  # int longer than Python's str-conversion limit
        pass
    return token


def _value(s: str, i: int, depth: int) -> tuple[Any, int]:
    i = _skip_ws(s, i)
    if s.startswith(QUOTE, i):
        return _string(s, i + len(QUOTE), _VALUE_END)
    if _partial(s, i, QUOTE):
        raise _Incomplete
    if s[i] in "{[":
        return _container(s, i + 1, depth + 1, "}" if s[i] == "{" else "]")
    token, j = _bare(s, i, _VALUE_END)
    if not token:
        raise _Malformed(j, "missing value")
    return _scalar(token), j


def _key(s: str, i: int) -> tuple[str, int]:
    i = _skip_ws(s, i)
    if s.startswith(QUOTE, i):
        return _string(s, i + len(QUOTE), ":")
    if _partial(s, i, QUOTE):
        raise _Incomplete
    return _bare(s, i, ":")


def _container(s: str, i: int, depth: int, close: str) -> tuple[dict | list, int]:
    # `{k:v,...}` when close is "}", `[v,...]` when it is "]"; i is just past the opener.
    if depth > MAX_DEPTH:
        raise _Malformed(i, "nesting too deep")
    out: dict | list = {} if close == "}" else []
    i = _skip_ws(s, i)
    if s[i] == close:
        return out, i + 1
    while True:
        if close == "}":
            key, i = _key(s, i)
            out[key], i = _value(s, i + 1, depth)  # i + 1 skips the ':'
        else:
            item, i = _value(s, i, depth)
            out.append(item)
        i = _skip_ws(s, i)
        if s[i] == close:
            return out, i + 1
        if s[i] != ",":
            raise _Malformed(i, f"expected ',' or {close!r}")
        i += 1


def _call(s: str, i: int) -> tuple[str, dict, int]:
    # `call:NAME{...}` starting at i (just past <|tool_call>); returns (name, args, end).
    if not s.startswith("call:", i):
        if _partial(s, i, "call:"):
            raise _Incomplete
        raise _Malformed(i, "expected 'call:'")
    j = _NAME.match(s, i + 5).end()
    if j == len(s):
        raise _Incomplete
    if s[j] != "{" or j == i + 5:
        raise _Malformed(j, "expected a function name and '{'")
    args, end = _container(s, j + 1, 1, "}")
    return s[i + 5:j], args, end


def _try_call(s: str, i: int) -> tuple[tuple[str, dict] | None, int, str]:
    """((name, args), end, "") when a complete call is followed by <tool_call|>;
    (None, -1, "") while more text could still complete it; (None, -1, error) otherwise."""
    try:
        name, args, end = _call(s, i)
    except _Incomplete:
        return None, -1, ""
    except _Malformed as e:
        return None, -1, f"malformed tool call at offset {e.pos - i}: {e.message}"
    if s.startswith(CALL_CLOSE, end):
        return (name, args), end, ""
    if _partial(s, end, CALL_CLOSE):
        return None, -1, ""
    return None, -1, f"expected {CALL_CLOSE} at offset {end - i}"


def parse_tool_call(text: str) -> tuple[str, dict]:
    """Strict inverse of `render_tool_call`: one whole call -> (name, arguments).
    Raises ValueError unless `text` is exactly one well-formed call."""
    if not text.startswith(CALL_OPEN):
        raise ValueError(f"tool call must start with {CALL_OPEN}")
    call, end, error = _try_call(text, len(CALL_OPEN))
    if call is None or end + len(CALL_CLOSE) != len(text):
        raise ValueError(error or "incomplete tool call or trailing text")
    return call


def _tool_call_entry(name: str, args: dict, make_id: Callable[[], str]) -> dict:
    arguments = json.dumps(args, ensure_ascii=False)
    return {"id": make_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _bad_call(out: ParsedOutput, body: str, message: str) -> int:
    # Keep a failed call's raw text as content, through the first <tool_call|> if any.
    k = body.find(CALL_CLOSE)
    stop = len(body) if k < 0 else k + len(CALL_CLOSE)
    raw = CALL_OPEN + body[:stop]
    out.content += raw
    out.errors.append(ToolCallError(message or "unterminated tool call", raw))
    return stop


# ---------------------------------------------------------------- whole text

def parse_output(text: str, make_id: Callable[[], str] | None = None) -> ParsedOutput:
    """Split a complete generation into reasoning, content, tool calls and parse errors.
    `make_id` makes tool-call ids (default: random `call_...`)."""
    make_id = make_id or _random_call_id
    out, pos = ParsedOutput(), 0
    while True:
        t, c = text.find(THOUGHT_OPEN, pos), text.find(CALL_OPEN, pos)
        if t < 0 and c < 0:
            out.content += text[pos:]
            return out
        if t >= 0 and (c < 0 or t < c):
            out.content += text[pos:t]
            j = t + len(THOUGHT_OPEN)
            j += len(THOUGHT_LABEL) if text.startswith(THOUGHT_LABEL, j) else 0
            k = text.find(THOUGHT_CLOSE, j)
            if k < 0:  # still thinking when generation stopped
                out.reasoning += text[j:]
                return out
            out.reasoning += text[j:k - 1] if text[j:k].endswith("\n") else text[j:k]
            pos = k + len(THOUGHT_CLOSE)
        else:
            out.content += text[pos:c]
            j = c + len(CALL_OPEN)
            call, end, error = _try_call(text, j)
            if call is not None:
                out.tool_calls.append(_tool_call_entry(*call, make_id))
                pos = end + len(CALL_CLOSE)
            else:
                pos = j + _bad_call(out, text[j:], error)


# ---------------------------------------------------------------- streaming

_CONTENT, _LABEL, _REASONING, _CALL = range(4)


def _held_suffix(s: str, delimiters: tuple[str, ...]) -> int:
    # Length of the longest tail of s that may be the start of a delimiter split across deltas.
    for n in range(min(len(s), max(map(len, delimiters)) - 1), 0, -1):
        if any(d.startswith(s[-n:]) for d in delimiters):
            return n
    return 0


class StreamParser:
    """Incremental `parse_output`: feed text deltas, get increments.

    The concatenation of all increments from `feed` and `finish` equals
    `parse_output(whole_text)`. Text that may begin a delimiter is held back until the
    next delta decides it; a tool call is emitted whole once its `<tool_call|>` arrives.
    """

    def __init__(self, make_id: Callable[[], str] | None = None):
        self._make_id = make_id or _random_call_id
        self._state = _CONTENT
        self._buf = ""  # text not yet emitted, starting after the current state's opener
        self._scan = 0  # in _CALL: no <tool_call|> starts before this offset of _buf

    def feed(self, delta: str) -> ParsedOutput:
        """Consume the next detokenized delta; return what became certain."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> ParsedOutput:
        """End of generation: flush held-back text and close whatever is open."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> ParsedOutput:
        out = ParsedOutput()
        step = (self._content, self._label, self._reasoning, self._call)
        while step[self._state](out, final):
            pass
        return out

    def _enter(self, state: int, buf: str) -> bool:
        self._state, self._buf, self._scan = state, buf, 0
        return True

    def _content(self, out: ParsedOutput, final: bool) -> bool:
        b = self._buf
        t, c = b.find(THOUGHT_OPEN), b.find(CALL_OPEN)
        if t < 0 and c < 0:
            keep = 0 if final else _held_suffix(b, (THOUGHT_OPEN, CALL_OPEN))
            out.content += b[:len(b) - keep]
            self._buf = b[len(b) - keep:]
            return False
        if t >= 0 and (c < 0 or t < c):
            out.content += b[:t]
            return self._enter(_LABEL, b[t + len(THOUGHT_OPEN):])
        out.content += b[:c]
        return self._enter(_CALL, b[c + len(CALL_OPEN):])

    def _label(self, out: ParsedOutput, final: bool) -> bool:
        b = self._buf
        if b.startswith(THOUGHT_LABEL):
            b = b[len(THOUGHT_LABEL):]
        elif THOUGHT_LABEL.startswith(b) and not final:
            return False  # "thou" may still become the label
        return self._enter(_REASONING, b)

    def _reasoning(self, out: ParsedOutput, final: bool) -> bool:
        b = self._buf
        k = b.find(THOUGHT_CLOSE)
        if k < 0:
            # hold "\n" too: the one newline before <channel|> is framing, not thought
            keep = 0 if final else _held_suffix(b, ("\n" + THOUGHT_CLOSE, THOUGHT_CLOSE))
            out.reasoning += b[:len(b) - keep]
            self._buf = b[len(b) - keep:]
            return False
        out.reasoning += b[:k - 1] if b[:k].endswith("\n") else b[:k]
        return self._enter(_CONTENT, b[k + len(THOUGHT_CLOSE):])

    def _call(self, out: ParsedOutput, final: bool) -> bool:
        b = self._buf
        if not final:
            # Every outcome needs a <tool_call|> in the buffer, so parse only once one is there.
            k = b.find(CALL_CLOSE, self._scan)
            self._scan = k if k >= 0 else max(0, len(b) - len(CALL_CLOSE) + 1)
            if k < 0:
                return False
        call, end, error = _try_call(b, 0)
        if call is not None:
            out.tool_calls.append(_tool_call_entry(*call, self._make_id))
            return self._enter(_CONTENT, b[end + len(CALL_CLOSE):])
        if not error and not final:
            return False
        return self._enter(_CONTENT, b[_bad_call(out, b, error):])
