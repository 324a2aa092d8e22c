"""Constrained decoding with llguidance: a per-request grammar that masks the tokens it forbids.

    grammars = Grammars(tokenizer, stop_ids)            # builds llguidance's tokenizer once (~2 s)
    constraint = grammars.json_schema({"type": "object", ...})   # or json_object(), tool_call(...)
    scheduler.submit(inputs, params, constraint=constraint)

A `Constraint` holds one llguidance matcher. Each decode step the scheduler asks every
constrained row for `allowed()` (a [V] bool mask, computed on the host from the tokens so far,
before the step's logits exist, so it adds no device sync) and afterwards tells it the sampled
token (`advance`). Once the grammar is complete only the stop ids stay allowed, so the reply
ends there. Knows nothing about HTTP or the chat format beyond Gemma's tool-call syntax.
"""

from __future__ import annotations

import re
import threading

import llguidance
import torch

from ..errors import InputError
from ..processing.parse import CALL_CLOSE, CALL_OPEN, QUOTE
from ..processing.tokenizer import Tokenizer

_BITS = torch.arange(32, dtype=torch.int32)


class Constraint:
    """One request's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_ids: tuple[int, ...]):
        if matcher.is_error():
            raise InputError(f"the grammar is invalid: {matcher.get_error()}")
        self.matcher, self.vocab_size, self.stop_ids = matcher, vocab_size, stop_ids

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool: the tokens the grammar accepts next (stop ids once it is complete)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words[:, None] >> _BITS) & 1).bool().reshape(-1)
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.numel())
        out[:n] = bits[:n]
        if self.matcher.is_error() or not out.any():  # nothing fits: let the reply end
            out[list(self.stop_ids)] = True
        return out

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

    def tool_call(self, tools: list[dict]) -> Constraint:
        """A reply that is exactly one call of one of `tools`, in Gemma 4's syntax
        (`<|tool_call>call:NAME{key:VALUE,...}<tool_call|>`), with keys from the tool's
        parameters and string / number / boolean values (nested values are not generated)."""
        call_open, call_close, quote = (self._token(t) for t in (CALL_OPEN, CALL_CLOSE, QUOTE))
        rules, alts = [], []
        for i, tool in enumerate(tools):
            fn = tool.get("function", {})
            name, props = fn.get("name", ""), (fn.get("parameters") or {}).get("properties") or {}
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
                raise InputError(f"tools[{i}].function.name {name!r} cannot be forced (letters, digits, _ . - only)")
            keys = [k for k in props if re.fullmatch(r"[A-Za-z0-9_]+", k)]
            arg = " | ".join(f'"{k}:" value' for k in sorted(keys, key=str.lower)) or '"x:" value'
            rules.append(f'call{i}: "call:{name}{{" (arg{i} ("," arg{i})*)? "}}"\narg{i}: {arg}')
            alts.append(f"call{i}")
        lark = (f"start: <[{call_open}]> ({' | '.join(alts)}) <[{call_close}]>\n" + "\n".join(rules) +
                f'\nvalue: <[{quote}]> /[A-Za-z0-9 .,!?]{{0,40}}/ <[{quote}]> | /-?[0-9]{{1,9}}/ | "true" | "false"\n')
        return self._constraint(llguidance.LLMatcher.grammar_from_lark(lark))

    def _token(self, text: str) -> int:
        i = self.tokenizer.token_to_id(text)
        if i is None:
            raise InputError(f"this tokenizer has no {text!r} token: tool calls cannot be forced")
        return i

