"""Continuous batching: requests join and leave the decode batch between steps.

    scheduler = Scheduler(engine, max_seqs=8, max_len=8192)
    scheduler.start()                                          # a thread runs step() while there is work
    request = scheduler.submit(inputs, SamplingParams(...))    # from any thread
    for delta in request: ...                                  # blocks for each delta
    request.cancel()                                           # its row is freed at the next step

One `step()`: drop cancelled requests; advance the oldest waiting request's prefill by one chunk
(prefill interleaves with decoding, so a long prompt delays the running streams by one chunk per
step, not by its whole length) and, once its prompt is in, copy its cache into a free row of the
batch; then one decode step for every running row: logits → sampler → deltas → finished rows
leave → one forward of the rest. Each row decodes exactly as it would alone: its own cache
row, positions, sampler row and generator.

With a drafter on the engine (Engine(drafter=...)), a request decoding alone (nothing waiting,
no grammar) runs speculative rounds (generate/speculative.py) in the batch's row 0: its last
token is then emitted but not yet fed, and when another request arrives (or a grammar row),
one forward of that token brings the row back to the batch's step and decoding goes on
batched. Greedy output is the same either way.

Limits: `max_seqs` rows decode at once, each up to `max_len` tokens (prompt + reply); their KV
memory is allocated once (`kv_bytes`). `max_queue` requests may wait; more are refused with
`QueueFull` (a server answers 429/503).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..cache.batch import BatchCache, bytes_per_row
from ..errors import InputError, QueueFull
from .engine import Completion, Delta, Engine, Timings, _collect, _Row
from .sampling import Sampler, SamplingParams
from .speculative import speculative_round


class Request:
    """One submitted conversation: iterate it for its deltas (the last has finish_reason)."""

    def __init__(self, rid: int, inputs: dict, params: SamplingParams, prompt_tokens: int, constraint=None):
        self.id, self.inputs, self.params = rid, inputs, params
        self.constraint = constraint  # a grammar (generate/grammar.py: allowed(), advance()) or None
        self.prompt_tokens = prompt_tokens
        self.submitted = time.perf_counter()
        self.cancelled = False
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop generating (a client went away); the row and its cache are freed at the next step."""
        self.cancelled = True

    def __iter__(self):
        while True:
            item = self._deltas.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def result(self) -> Completion:
        return _collect(iter(self))


@dataclass
class _Running:
    request: Request
    row: _Row
    timings: Timings
    first: float | None = None


class Scheduler:
    def __init__(self, engine: Engine, *, max_seqs: int = 8, max_len: int | None = None,
                 max_queue: int = 64, reserve: int = 16):
        self.engine = engine
        m = engine.model
        self.max_len = min(max_len or engine.context, engine.context)
        self.max_seqs, self.max_queue = max_seqs, max_queue
        with torch.inference_mode():
            self.cache = BatchCache(m.config.text, max_seqs, self.max_len, m.dtype, m.device, reserve)
        self.kv_bytes = max_seqs * bytes_per_row(m.config.text, self.max_len, m.dtype, reserve)
        self.sampler = Sampler([], m.config.text.vocab_size, m.device, eos_ids=sorted(engine.base_stop_ids))
        self.running: list[_Running] = []
        self.h = torch.zeros(0, m.config.text.hidden_size, dtype=m.dtype, device=m.device)  # [n, hidden]
        self.waiting: deque[Request] = deque()
        self.prefilling: tuple[Request, object] | None = None
        self.tokens_out = 0  # completion tokens produced so far (metrics)
        self.solo: tuple[int, torch.Tensor] | None = None  # speculating: (emitted token not yet fed, its hidden)
        self.drafted = self.accepted = 0  # speculative totals (metrics)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- submitting (any thread) -------------------------------------------------------------
    def submit(self, inputs: dict, params: SamplingParams | None = None, constraint=None) -> Request:
        """Queue one conversation. constraint: a grammar whose mask each of its steps samples under."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise InputError(f"submit takes one conversation (input_ids [1, S]), got {list(ids.shape)}")
        n = ids.shape[1]
        if n >= self.max_len:
            raise InputError(f"the prompt is {n} tokens; at most {self.max_len - 1} fit with room for a reply")
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again later")
            request = Request(next(self._ids), inputs, params, n, constraint)
            self.waiting.append(request)
            self._wake.notify()
        return request

    def stats(self) -> dict:
        """Queue depth, running rows, KV use: what a metrics endpoint shows."""
        used = sum(self.cache.host_lengths[:self.cache.n])
        return {"waiting": len(self.waiting), "prefilling": int(self.prefilling is not None),
                "running": len(self.running), "max_seqs": self.max_seqs,
                "kv_tokens_used": used, "kv_tokens_total": self.max_seqs * self.max_len,
                "kv_bytes": self.kv_bytes, "completion_tokens": self.tokens_out,
                "drafted_tokens": self.drafted, "accepted_tokens": self.accepted}

    # -- the background thread ---------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="unigemma-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.has_work():
                    self._wake.wait()
                if self._stop:
                    return
            self.step()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def run_until_done(self) -> None:
        """Step on this thread until nothing is waiting or running (tests, offline batches)."""
        while self.has_work():
            self.step()

    # -- one scheduler step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        try:
            if self.solo is not None and not self._can_speculate():
                self._leave_solo()  # before a new row joins: the batch step wants every row fed
            self._advance_prefill()
            if self.running:
                if self._can_speculate():
                    self._speculative_step()
                else:
                    self._decode_step()
        except Exception as e:  # the batch's cache can no longer be trusted: fail its rows, start afresh
            for run in self.running:
                run.request._deltas.put(e)
            self._reset()

    def _reset(self) -> None:
        c = self.cache
        with torch.inference_mode():
            self.cache = BatchCache(c.config, c.rows, c.max_len, self.h.dtype, self.h.device, c.reserve)
        self.sampler = Sampler([], self.sampler.vocab_size, self.sampler.device, eos_ids=self.sampler.eos_ids)
        self.running, self.h, self.solo = [], self.h[:0], None

    def _drop_cancelled(self) -> None:
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r._deltas.put(Delta(finish_reason="cancelled"))
        if self.prefilling is not None and self.prefilling[0].cancelled:
            self.prefilling[0]._deltas.put(Delta(finish_reason="cancelled"))
            self.prefilling = None
        gone = [i for i, run in enumerate(self.running) if run.request.cancelled]
        for i in gone:
            self.running[i].request._deltas.put(Delta(finish_reason="cancelled"))
        self._remove_rows(gone)

    def _advance_prefill(self) -> None:
        if self.prefilling is None:
            if len(self.running) >= self.max_seqs:
                return
            with self._lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            steps = self.engine.prefill_steps(request.inputs, [request.params], None,
                                              max_len=request.prompt_tokens)
            self.prefilling = (request, steps)
        request, steps = self.prefilling
        try:
            next(steps)
            return  # one chunk per step
        except StopIteration as done:
            cache, h, _ = done.value
        except Exception as e:  # bad media, ...: this request fails, the others go on
            self.prefilling = None
            request._deltas.put(e)
            return
        self.prefilling = None
        try:
            self._admit(request, cache, h)
        except Exception as e:  # the batch is half-updated: fail its rows (and this one), start afresh
            for run in self.running:
                if run.request is not request:
                    run.request._deltas.put(e)
            request._deltas.put(e)
            self._reset()

    def _admit(self, request: Request, cache, h: torch.Tensor) -> None:
        self.cache.insert(cache)
        ids = request.inputs["input_ids"][0]
        mask = request.inputs.get("attention_mask")
        self.sampler.add(request.params, ids if mask is None else ids[mask[0].bool()])
        row = _Row(self.engine.tokenizer, request.params, self.engine._stop_ids(request.params))
        self.running.append(_Running(request, row, Timings(prompt_tokens=request.prompt_tokens,
                                                             prefill_s=time.perf_counter() - request.submitted)))
        self.h = torch.cat([self.h, h.to(self.h.dtype)])

    def _decode_step(self) -> None:
        keep = self._sample_and_emit()
        if self.running:
            m = self.engine.model
            tokens = self._last[keep]
            self.h = m(tokens[:, None], self.cache.positions[:, None], cache=self.cache, require_media=False)[:, -1]

    def _sample_and_emit(self) -> list[int]:
        """Sample every row's next token from self.h, hand out the deltas, free finished rows.
        Returns the old index of each remaining row (their tokens: self._last[keep])."""
        m = self.engine.model
        constraints = [run.request.constraint for run in self.running]
        allowed = None
        if any(c is not None for c in constraints):  # grammar masks come from the host's token history
            allowed = torch.ones(len(constraints), self.sampler.vocab_size, dtype=torch.bool)
            for r, c in enumerate(constraints):
                if c is not None:
                    allowed[r] = c.allowed()
        out = self.sampler.sample(m.head(self.h), allowed)
        host = out.tokens.tolist()  # the one host sync per step: text is built on the host
        for c, token in zip(constraints, host):
            if c is not None:
                c.advance(token)
        wants = any(run.request.params.logprobs for run in self.running)
        lps = out.host_logprobs() if wants else [None] * len(host)
        now = time.perf_counter()
        self.sampler.observe(out.tokens)
        finished = []
        for r, run in enumerate(self.running):
            delta = run.row.push(host[r], lps[r] if run.request.params.logprobs else None)
            t = run.timings
            t.completion_tokens += 1
            self.tokens_out += 1
            if run.first is None:
                run.first, t.ttft_s = now, now - run.request.submitted
            if run.row.finish is None and self.cache.host_lengths[r] >= self.max_len:
                run.request._deltas.put(delta)  # the row is full: this token is its last
                delta = run.row.end(Delta(), "", "length")
            if run.row.finish is not None:
                t.decode_s = now - run.first
                delta.timings = t
                finished.append(r)
            run.request._deltas.put(delta)
        self._last = out.tokens
        return self._remove_rows(finished)

    # -- speculative rounds for a request decoding alone ---------------------------------------
    def _can_speculate(self) -> bool:
        return (self.engine.proposer is not None and len(self.running) == 1 and not self.waiting
                and self.prefilling is None and self.running[0].request.constraint is None)

    def _leave_solo(self) -> None:
        x, _ = self.solo
        self.solo = None
        if self.running:
            m = self.engine.model
            self.h = m(torch.tensor([[x]], device=m.device), self.cache.positions[:, None], cache=self.cache,
                       require_media=False)[:, -1]

    def _speculative_step(self) -> None:
        """One round for row 0: draft k tokens after x, verify [x, drafts] in one forward, keep
        the accepted ones and the target's own next token (Engine._decode_speculative's round)."""
        if self.solo is None:  # entering: sample x as a batch step would, then hold it unfed
            keep = self._sample_and_emit()
            if not self.running:
                return
            self.solo = (int(self._last[keep][0]), self.h)
        e, m, c = self.engine, self.engine.model, self.cache
        x, h_prev = self.solo
        run = self.running[0]
        room = min(self.max_len - c.host_lengths[0] - 1, c.reserve - 2, e.reserve - 2)
        if room < 1:  # no room left to draft: back to plain steps
            self._leave_solo()
            return self._decode_step()
        k = min(e.draft.next(), room)
        p = run.request.params
        got, h_next = speculative_round(m, e.proposer, e.draft, c, self.sampler, x, h_prev, k,
                                        p.top_logprobs if p.logprobs else None)
        kept = len(got.tokens) - 1
        t = run.timings
        t.drafted, t.accepted, t.verify_forwards = t.drafted + k, t.accepted + kept, t.verify_forwards + 1
        self.drafted, self.accepted = self.drafted + k, self.accepted + kept
        now = time.perf_counter()
        for j, (token, lp) in enumerate(zip(got.tokens, got.logprobs)):
            delta = run.row.push(token, lp if p.logprobs else None)
            t.completion_tokens += 1
            self.tokens_out += 1
            if run.row.finish is None and j == kept and c.host_lengths[0] >= self.max_len:
                run.request._deltas.put(delta)  # the row is full: this token is its last
                delta = run.row.end(Delta(), "", "length")
            if run.row.finish is not None:
                t.decode_s = now - run.first
                delta.timings = t
                run.request._deltas.put(delta)
                self._remove_rows([0])
                return
            run.request._deltas.put(delta)
        self.solo = (got.tokens[-1], h_next)

    def _remove_rows(self, rows: list[int]) -> list[int]:
        """Free these rows: each is filled by the last row, in the cache, the sampler and the
        host lists alike. Returns the old index of each remaining row."""
        keep = list(range(len(self.running)))
        for r in sorted(rows, reverse=True):
            self.cache.remove(r)
            keep[r] = keep[-1]
            keep.pop()
        if rows:
            self.sampler.select(keep)
            self.running = [self.running[k] for k in keep]
            self.h = self.h[keep]
            if not self.running:
                self.solo = None
        return keep
