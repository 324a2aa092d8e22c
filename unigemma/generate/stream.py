"""A reply as it is produced: sampled tokens in, deltas out.

`RowText` turns one row's tokens into text deltas (detokenizing, stop ids and strings, the
thought / tool-call parser); `Reply` adds what every decode path must count the same way
(completion tokens, time to first token, decode time, the finish when a row is full) and is
the only place that does. `Delta`, `Completion`, `Timings` and `collect` are the results the
engine, the scheduler, the pipeline and the server hand out.

This module knows nothing about models, caches or batches: it sees one row's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..processing.parse import ParsedOutput, StreamParser, ToolCallError
from ..processing.tokenizer import StreamDecoder, Tokenizer
from .sampling import SamplingParams
from .stops import StopChecker


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the session's cache
    completion_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # submit -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    drafted: int = 0  # speculative decoding: tokens the drafter proposed
    accepted: int = 0  # ... of which the target kept
    verify_forwards: int = 0  # ... target forwards that checked them
    forced: int = 0  # tokens a grammar forced, emitted without a forward of their own (jump-forward)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return (self.accepted + self.verify_forwards) / self.verify_forwards if self.verify_forwards else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s else 0.0


@dataclass
class Delta:
    """One streamed increment of a reply."""
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # per token: {"token_id", "logprob", "top": [(id, lp)]}
    finish_reason: str | None = None  # set on the last delta: "stop", "length", "tool_calls" or "cancelled"
    timings: Timings | None = None  # set on the last delta


@dataclass
class Completion:
    content: str
    reasoning: str
    tool_calls: list[dict]
    finish_reason: str
    token_ids: list[int]
    logprobs: list[dict]
    timings: Timings
    errors: list[ToolCallError] = field(default_factory=list)


def collect(deltas: Iterable[Delta]) -> Completion:
    """A whole reply from its deltas."""
    c = Completion("", "", [], "length", [], [], Timings())
    for d in deltas:
        c.content += d.content
        c.reasoning += d.reasoning
        c.tool_calls += d.tool_calls
        c.token_ids += d.token_ids
        c.logprobs += d.logprobs
        if d.finish_reason:
            c.finish_reason, c.timings = d.finish_reason, d.timings
    return c


class RowText:
    """Turns one row's sampled tokens into deltas: detokenize, stop strings, parse."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, stop_ids: set[int]):
        self.params, self.stop_ids = params, stop_ids
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopChecker(params.stop)
        self.parser = StreamParser()
        self.ids: list[int] = []
        self.finish: str | None = None
        self.any_tool_call = False

    def push(self, token: int, logprob: dict | None) -> Delta:
        delta = Delta(token_ids=[token], logprobs=[logprob] if logprob else [])
        self.ids.append(token)
        if token in self.stop_ids:  # the sampler masks stop ids before min_tokens
            return self.end(delta, "", "stop")
        text, stopped = self.stops.feed(self.decoder.add(token))
        if stopped:
            self.finish = "stop"
            return self.parsed(delta, text, final=True)
        if len(self.ids) >= self.params.max_tokens:
            return self.end(delta, text, "length")
        return self.parsed(delta, text, final=False)

    def end(self, delta: Delta, text: str, reason: str) -> Delta:
        """Finish with whatever text is still held back (incomplete characters, stop-string prefixes)."""
        tail, stopped = self.stops.feed(self.decoder.flush())
        self.finish = "stop" if stopped else reason
        return self.parsed(delta, text + tail + ("" if stopped else self.stops.flush()), final=True)

    def parsed(self, delta: Delta, text: str, final: bool) -> Delta:
        out: ParsedOutput = self.parser.feed(text)
        if final:
            out.extend(self.parser.finish())
        delta.content, delta.reasoning, delta.tool_calls = out.content, out.reasoning, out.tool_calls
        self.any_tool_call |= bool(out.tool_calls)
        if final:
            delta.finish_reason = "tool_calls" if self.any_tool_call and self.finish == "stop" else self.finish
        return delta


class Reply:
    """One request's reply: its text state and timings. `emit` is the per-token bookkeeping
    every decode path shares (plain batch steps and speculative runs alike)."""

    def __init__(self, text: RowText, timings: Timings, start: float):
        self.text, self.timings = text, timings
        self.start = start  # when the request was submitted: TTFT counts from here
        self.first: float | None = None  # when its first token was sampled

    @property
    def finished(self) -> bool:
        return self.text.finish is not None

    def emit(self, token: int, logprob: dict | None, now: float, full: bool = False) -> list[Delta]:
        """One sampled token -> its deltas (two when `full`: the row has no room for another
        token, so this one is the last and a closing "length" delta follows)."""
        delta = self.text.push(token, logprob)
        t = self.timings
        t.completion_tokens += 1
        if self.first is None:
            self.first, t.ttft_s = now, now - self.start
        out = []
        if full and not self.finished:
            out.append(delta)
            delta = self.text.end(Delta(), "", "length")
        if self.finished:
            t.decode_s = now - self.first
            delta.timings = t
        out.append(delta)
        return out


__all__ = ["Timings", "Delta", "Completion", "collect", "RowText", "Reply"]
