"""The generation engine: chunked prefill, prefix reuse across chat turns, sampling, streaming.

    engine = Engine(model, tokenizer)
    session = engine.session()                       # one chat: its KV cache outlives a turn
    for delta in engine.stream(inputs, SamplingParams(temperature=0.7), session):
        print(delta.content, end="")

`inputs` are the processor's tensors (`Processor(...)(messages)`). Prefill runs in chunks of at
most `prefill_chunk` tokens that never cut an image (or video frame): its bidirectional block
must see itself whole within one forward. A session remembers the tokens (and media) in its
cache; the next turn prefills only what differs from them. Decoding is one forward per token
over the preallocated cache; everything per row (detokenizing, stop strings, thought/tool-call
parsing) happens on the host after the step. Several conversations of one call decode together
(`generate_batch`, left-padded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..cache.kv import KVCache
from ..errors import InputError
from ..inputs import ModelInputs
from ..models.drafter import Drafter
from ..models.gemma4 import Gemma4Unified
from ..processing.parse import ParsedOutput, StreamParser, ToolCallError
from ..processing.tokenizer import StreamDecoder, Tokenizer
from .sampling import Sampler, SamplingParams
from .speculative import DraftLength, MTPProposer, speculative_round
from .stops import StopChecker


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the session's cache
    completion_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # call start -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    drafted: int = 0  # speculative decoding: tokens the drafter proposed
    accepted: int = 0  # ... of which the target kept
    verify_forwards: int = 0  # ... target forwards that checked them

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
    finish_reason: str | None = None  # set on the last delta: "stop", "length" or "tool_calls"
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


@dataclass
class Session:
    """A chat's cache and the token keys it holds (ids, media placeholders keyed by content)."""
    cache: KVCache | None = None
    keys: list = field(default_factory=list)


# --- per-row text state ---------------------------------------------------------------
class _Row:
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
            return self._parsed(delta, text, final=True)
        if len(self.ids) >= self.params.max_tokens:
            return self.end(delta, text, "length")
        return self._parsed(delta, text, final=False)

    def end(self, delta: Delta, text: str, reason: str) -> Delta:
        """Finish with whatever text is still held back (incomplete characters, stop-string prefixes)."""
        tail, stopped = self.stops.feed(self.decoder.flush())
        self.finish = "stop" if stopped else reason
        return self._parsed(delta, text + tail + ("" if stopped else self.stops.flush()), final=True)

    def _parsed(self, delta: Delta, text: str, final: bool) -> Delta:
        out: ParsedOutput = self.parser.feed(text)
        if final:
            out.extend(self.parser.finish())
        delta.content, delta.reasoning, delta.tool_calls = out.content, out.reasoning, out.tool_calls
        self.any_tool_call |= bool(out.tool_calls)
        if final:
            delta.finish_reason = "tool_calls" if self.any_tool_call and self.finish == "stop" else self.finish
        return delta


# --- the engine -----------------------------------------------------------------------
class Engine:
    def __init__(self, model: Gemma4Unified, tokenizer: Tokenizer, *, prefill_chunk: int = 512,
                 reserve: int = 64, drafter: Drafter | None = None, draft: DraftLength | None = None):
        """reserve: tokens a session's sliding-layer rings can roll back (a new turn that
        rewrites the end of the last one, e.g. dropping its thoughts, reuses the rest; rejected
        speculative drafts). drafter: an MTP drafter; one conversation at a time then decodes
        speculatively (`draft`: the draft length, fixed or adaptive)."""
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk, self.reserve = prefill_chunk, reserve
        self.proposer = MTPProposer(model, drafter) if drafter is not None else None
        self.draft = draft or DraftLength()
        c = model.config
        self.context = c.text.max_position_embeddings
        self.media_ids = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}
        self.base_stop_ids = set(tokenizer.eos_ids) | set(c.stop_token_ids)

    def session(self) -> Session:
        return Session()

    def _stop_ids(self, p: SamplingParams) -> set[int]:
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.base_stop_ids)

    # -- prefill -------------------------------------------------------------------------
    def _check_length(self, n_prompt: int, params: list[SamplingParams]) -> int:
        if n_prompt >= self.context:
            raise InputError(f"the prompt is {n_prompt} tokens; the model's context is {self.context} tokens")
        return min(self.context, n_prompt + max(p.max_tokens for p in params))

    @torch.inference_mode()
    def prefill(self, inputs: dict, params: list[SamplingParams], session: Session | None = None):
        """Run the prompt (minus what the session already holds) -> (cache, last hidden [B, hidden], cached)."""
        steps = self.prefill_steps(inputs, params, session)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, inputs: dict, params: list[SamplingParams], session: Session | None = None,
                      max_len: int | None = None):
        """`prefill` one chunk per `next()` (the scheduler interleaves chunks with decode steps);
        returns what `prefill` returns. max_len: the cache's size (default: prompt + max_tokens)."""
        m = self.model
        inputs = ModelInputs.coerce(inputs)
        ids = inputs["input_ids"].to(m.device)
        B, S = ids.shape
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(m.device)
        types = inputs.get("mm_token_type_ids")
        max_len = max_len or self._check_length(S, params)
        cached = 0
        if session is not None:
            if B != 1:
                raise InputError("a chat session holds one conversation")
            keys = inputs.token_keys(self.media_ids)
            if session.cache is not None and not session.cache.broken:
                common = 0
                for a, b in zip(session.keys, keys):
                    if a != b:
                        break
                    common += 1
                common = min(common, S - 1)  # the last prompt token is always run: its logits start the reply
                back = session.cache.length - common
                if session.cache.can_trim(back):
                    session.cache.trim(back)
                    session.cache.grow(max_len)
                    cached = common
            if cached == 0:
                session.cache = m.make_cache(1, max_len, reserve=self.reserve)
            cache = session.cache
            session.keys = keys[:cached]  # extended below once the prefill succeeded
        else:
            cache = m.make_cache(B, max_len, reserve=self.reserve)
        media = inputs.media()
        with torch.inference_mode():
            embeds = m.embed(ids, **media)  # once for the whole prompt: chunks take slices
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = None
        for a, b in inputs.chunks(cached, self.prefill_chunk):
            with torch.inference_mode():
                h = m(ids[:, a:b], positions[:, a:b], attention_mask=mask[:, a:b], embeds=embeds[:, a:b],
                      mm_token_type_ids=None if types is None else types[:, a:b].to(m.device), cache=cache)
            if b < S:
                yield
        if session is not None:
            session.keys = keys
        return cache, h[:, -1], cached

    # -- decode ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode(self, inputs: dict, params: list[SamplingParams], session: Session | None
                ) -> Iterator[tuple[int, Delta]]:
        """Yield (row, delta) for every sampled token until every row has finished."""
        if self.proposer is not None and len(params) == 1:
            yield from ((0, d) for d in self._decode_speculative(inputs, params[0], session))
            return
        t0 = time.perf_counter()
        m = self.model
        ids = inputs["input_ids"]
        cache, h, cached = self.prefill(inputs, params, session)
        prefill_s = time.perf_counter() - t0
        B = ids.shape[0]
        sampler = Sampler(params, m.config.text.vocab_size, m.device,
                          eos_ids=sorted(self.base_stop_ids))
        mask = inputs.get("attention_mask")
        for r in range(B):
            sampler.observe_prompt(r, ids[r] if mask is None else ids[r][mask[r].bool()])
        rows = [_Row(self.tokenizer, p, self._stop_ids(p)) for p in params]
        timings = [Timings(prompt_tokens=int(ids.shape[1] if mask is None else mask[r].sum()),
                           cached_tokens=cached, prefill_s=prefill_s) for r in range(B)]
        first = None
        pad = m.config.text.pad_token_id
        while True:
            out = sampler.sample(m.head(h))
            tokens = out.tokens
            now = time.perf_counter()
            if first is None:
                first = now
            host = tokens.tolist()  # the one host sync per step: text must be built on the host
            lps = out.host_logprobs() if any(p.logprobs for p in params) else [None] * B
            for r, row in enumerate(rows):
                if row.finish is not None:
                    continue
                delta = row.push(host[r], lps[r] if params[r].logprobs else None)
                t = timings[r]
                t.completion_tokens += 1
                if t.completion_tokens == 1:
                    t.ttft_s = now - t0
                if row.finish is not None:
                    t.decode_s = now - first
                    delta.timings = t
                yield r, delta
            if all(row.finish is not None for row in rows) or cache.length >= cache.max_len:
                break
            done = torch.tensor([row.finish is not None for row in rows], device=m.device)
            tokens = torch.where(done, pad, tokens)
            sampler.observe(tokens)
            h = m(tokens[:, None], cache.positions[:, None], cache=cache, require_media=False)[:, -1]
            if session is not None:
                session.keys.append(host[0])
        for r, row in enumerate(rows):  # context exhausted
            if row.finish is None:
                delta = row.end(Delta(), "", "length")
                timings[r].decode_s = time.perf_counter() - first
                delta.timings = timings[r]
                yield r, delta

    @torch.inference_mode()
    def _decode_speculative(self, inputs: dict, p: SamplingParams, session: Session | None) -> Iterator[Delta]:
        """One conversation, decoded in speculative rounds (generate/speculative.py)."""
        t0 = time.perf_counter()
        m = self.model
        ids = inputs["input_ids"]
        cache, h, cached = self.prefill(inputs, [p], session)
        sampler = Sampler([p], m.config.text.vocab_size, m.device, eos_ids=sorted(self.base_stop_ids))
        mask = inputs.get("attention_mask")
        sampler.observe_prompt(0, ids[0] if mask is None else ids[0][mask[0].bool()])
        row = _Row(self.tokenizer, p, self._stop_ids(p))
        t = Timings(prompt_tokens=int(ids.shape[1] if mask is None else mask[0].sum()), cached_tokens=cached,
                    prefill_s=time.perf_counter() - t0)
        top = p.top_logprobs if p.logprobs else None
        first = sampler.sample(m.head(h))
        sampler.observe(first.tokens)
        x = int(first.tokens[0])
        pending = [(x, first.host_logprobs()[0] if p.logprobs else None)]
        h_prev = h
        while True:
            for j, (tok, lp) in enumerate(pending):  # emit; a stop may come before the run's end
                delta = row.push(tok, lp)
                t.completion_tokens += 1
                now = time.perf_counter()
                if t.completion_tokens == 1:
                    t.ttft_s, t_first = now - t0, now
                if row.finish is not None:
                    cache.trim(len(pending) - 1 - j)  # keep the cache = everything but the last token
                    if session is not None:
                        del session.keys[cache.length:]
                    t.decode_s = now - t_first
                    delta.timings = t
                    yield delta
                    return
                yield delta
            room = cache.max_len - cache.length - 1  # drafts that fit behind x
            if room < 0:
                break
            k = min(self.draft.next(), room, self.reserve - 2)
            if session is not None:
                session.keys.append(x)
            if k == 0:  # no room to draft: one plain step
                h_prev = m(torch.tensor([[x]], device=m.device), cache.positions[:, None], cache=cache,
                           require_media=False)[:, -1]
                out = sampler.sample(m.head(h_prev))
                sampler.observe(out.tokens)
                x = int(out.tokens[0])
                pending = [(x, out.host_logprobs()[0] if p.logprobs else None)]
                continue
            got, h_prev = speculative_round(m, self.proposer, self.draft, cache, sampler, x, h_prev, k, top)
            kept = len(got.tokens) - 1
            t.drafted, t.accepted, t.verify_forwards = t.drafted + k, t.accepted + kept, t.verify_forwards + 1
            if session is not None:
                session.keys.extend(got.tokens[:kept])
            x = got.tokens[-1]
            pending = list(zip(got.tokens, got.logprobs))
        delta = row.end(Delta(), "", "length")  # context exhausted
        t.decode_s = time.perf_counter() - t_first
        delta.timings = t
        yield delta

    def stream(self, inputs: dict, params: SamplingParams | None = None,
               session: Session | None = None) -> Iterator[Delta]:
        """Deltas of one conversation's reply; the last has finish_reason and timings."""
        if inputs["input_ids"].shape[0] != 1:
            raise InputError("stream() takes one conversation; use generate_batch for several")
        for _, delta in self._decode(inputs, [params or SamplingParams()], session):
            yield delta

    def generate(self, inputs: dict, params: SamplingParams | None = None, session: Session | None = None) -> Completion:
        return _collect(self.stream(inputs, params, session))

    def generate_batch(self, inputs: dict, params: SamplingParams | list[SamplingParams] | None = None
                       ) -> list[Completion]:
        """Several left-padded conversations decoded together, each with its own parameters."""
        B = inputs["input_ids"].shape[0]
        params = params if isinstance(params, list) else [params or SamplingParams()] * B
        if len(params) != B:
            raise InputError(f"{len(params)} sampling parameter sets for {B} conversations")
        per_row: list[list[Delta]] = [[] for _ in range(B)]
        for r, delta in self._decode(inputs, params, None):
            per_row[r].append(delta)
        return [_collect(iter(d)) for d in per_row]


def _collect(deltas: Iterator[Delta]) -> Completion:
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
