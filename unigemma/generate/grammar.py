"""Constrained decoding with llguidance: a per-request grammar that masks the tokens it forbids.

    grammars = Grammars(tokenizer, stop_ids)            # builds llguidance's tokenizer once (~2 s)
    constraint = grammars.json_schema({"type": "object", ...})   # or json_object(), tool_call(...),
                                                                 # tool_or_text(...), tool_or_json(...)
    scheduler.submit(inputs, params, constraint=constraint)

A `Constraint` holds one llguidance matcher. Each decode step the scheduler asks every
constrained row for `allowed()` (a [V] bool mask, computed on the host from the tokens so far,
before the step's logits exist, so it adds no device sync) and afterwards tells it the sampled
token (`advance`). Once the grammar is complete only the stop ids stay allowed, so the reply
ends there. Knows nothing about HTTP or the chat format beyond Gemma's tool-call syntax.
"""

from __future__ import annotations

import json
import threading

import llguidance
import numpy as np
import torch

from ..errors import InputError
from ..processing.parse import CALL_CLOSE, CALL_OPEN, QUOTE, THOUGHT_CLOSE, THOUGHT_OPEN
from ..processing.tokenizer import Tokenizer
from .tool_grammar import ToolRules, regex_escape as _spelled




class Constraint:
    """One request's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_ids: tuple[int, ...]):
        if matcher.is_error():
            raise InputError(f"the grammar is invalid: {matcher.get_error()}")
        self.matcher, self.vocab_size, self.stop_ids = matcher, vocab_size, stop_ids

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool: the tokens the grammar accepts next (stop ids once it is complete)."""
        # llguidance's mask is little-endian 32-bit words: token i is bit i % 8 of byte i // 8
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.size)
        out[:n] = torch.from_numpy(bits[:n].view(np.bool_))
        if self.matcher.is_error() or not out.any():  # nothing fits: let the reply end
            out[list(self.stop_ids)] = True
        return out

    def copy(self) -> "Constraint":
        """The same grammar at the same point, with its own state (one per choice)."""
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.stop_ids)

    def forced(self) -> list[int]:
        """The tokens the grammar now forces, whatever the model would say (empty once complete:
        then the reply may end or not)."""
        if self.matcher.is_error() or self.matcher.is_accepting():
            return []
        return [t for t in self.matcher.compute_ff_tokens()]

    def advance(self, token: int) -> None:
        if token not in self.stop_ids:
            self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()


class Grammars:
    """Builds constraints for one tokenizer. llguidance's tokenizer is built lazily, once."""

    def __init__(self, tokenizer: Tokenizer, stop_ids, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_ids = tuple(sorted(stop_ids))
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                # our tokenizers.Tokenizer serialised: llguidance reads the same BPE and special tokens
                self._ll = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.tokenizer.vocab_size,
                                                  eos_token=list(self.stop_ids))
            return self._ll

    def _constraint(self, grammar: str) -> Constraint:
        try:  # a bad grammar puts the matcher in an error state (Constraint raises InputError)
            matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        except Exception as e:  # misuse at the API level (unreadable grammar JSON)
            raise InputError(f"the grammar is invalid: {e}") from None
        return Constraint(matcher, self.vocab_size, self.stop_ids)

    def json_schema(self, schema: dict) -> Constraint:
        """Output that is one JSON value valid under `schema` (compact separators)."""
        if not isinstance(schema, dict):
            raise InputError(f"json_schema.schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:
            raise InputError(f"json_schema.schema is not a usable JSON schema: {e}") from None
        return self._constraint(grammar)

    def json_object(self) -> Constraint:
        """Any JSON object."""
        return self.json_schema({"type": "object"})

    def tool_call(self, tools: list[dict], parallel: bool = False) -> Constraint:
        """A reply that is one call (or, with `parallel`, one or more calls) of `tools`, in
        Gemma 4's syntax (`<|tool_call>call:NAME{key:VALUE,...}<tool_call|>`), each with
        arguments valid under its tool's parameters schema (tool_grammar.py)."""
        calls, rules = self._calls(tools, parallel)
        return self._lark(f"start: {calls}\n" + rules)

    def tool_or_text(self, tools: list[dict], parallel: bool = False, thinking: bool = False) -> Constraint:
        """tool_choice "auto": free text, then optionally schema-true calls (as `tool_call`);
        with `thinking`, a thought channel (`<|channel>...<channel|>`) may come first. The
        text cannot spell a call or channel opener in plain characters (nor the thought a channel
        close), so every call the parser finds went through the grammar."""
        calls, rules = self._calls(tools, parallel)
        thought = ""
        if thinking:
            opened, closed = self._token(THOUGHT_OPEN), self._token(THOUGHT_CLOSE)
            thought = f"(<[{opened}]> THOUGHT <[{closed}]>)? "
        return self._lark(f"start: {thought}TEXT? ({calls})?\n" + rules +
                          f"THOUGHT: /(?s:.*)/ & ~/(?s:.*){_spelled(THOUGHT_CLOSE)}(?s:.*)/\n"
                          f"TEXT: /(?s:.+)/ & ~/(?s:.*)({_spelled(CALL_OPEN)}|{_spelled(THOUGHT_OPEN)})(?s:.*)/\n")

    def tool_or_json(self, tools: list[dict], schema: dict | None, parallel: bool = False) -> Constraint:
        """Tools beside response_format: schema-true calls (as `tool_call`) or one JSON value
        valid under `schema` (None: any JSON object), compact as `json_schema` writes it."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise InputError(f"json_schema.schema must be an object, got {type(schema).__name__}")
        schema = {"x-guidance": {"whitespace_flexible": False}, **schema}
        calls, rules = self._calls(tools, parallel)
        return self._lark(f"start: ({calls}) | reply\nreply: %json {json.dumps(schema)}\n" + rules)

    def _calls(self, tools: list[dict], parallel: bool) -> tuple[str, str]:
        """(the expression for the calls, the rules it needs)."""
        call_open, call_close = self._token(CALL_OPEN), self._token(CALL_CLOSE)
        rules = ToolRules(self._token(QUOTE))
        alts = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") or {}
            alts.append(rules.function(fn.get("name"), fn.get("parameters"), f"tools[{i}].function"))
        one = f"<[{call_open}]> ({' | '.join(alts)}) <[{call_close}]>"
        return (f"({one})+" if parallel else one), rules.text()

    def _lark(self, lark: str) -> Constraint:
        return self._constraint(llguidance.LLMatcher.grammar_from_lark(lark))

    def _token(self, text: str) -> int:
        i = self.tokenizer.token_to_id(text)
        if i is None:
            raise InputError(f"this tokenizer has no {text!r} token: tool calls cannot be forced")
        return i

