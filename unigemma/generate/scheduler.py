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

It is the only decode loop: `Engine.generate` / `stream` / `generate_batch` submit to a scheduler
of their own and step it on the caller's thread (`drive`, `run_until_done`). A chat session's
row is saved back into the session's cache when its reply is done (`submit(..., session=)`).

Other work on the model (scoring a prompt: generate/score.py) goes through `call(fn, ...)`,
which runs it on the scheduler's thread between two steps: the model and its caches belong to
that thread, and a forward from another thread would race the batch's.

With a prefix cache (`prefix_cache_mb`, cache/prefix.py), a prompt's prefill first restores the
longest prefix computed before (Engine.prefill_steps), and a finished row's prompt + reply is
remembered (`_remember`), so an agent loop's next turn prefills only what it added.

With LoRA adapters on the model (lora/), each request runs under one adapter or none (`submit`'s
`adapter`; default: the model's active one): the prefill chunk and every decode step select
each row's adapter (`_select`), so requests for different adapters and the base share the
decode batch, the adapters applied unmerged per row, and the prefix cache keys K/V by adapter.

Limits: `max_seqs` rows decode at once, each up to `max_len` tokens (prompt + reply); their KV
memory is allocated once (`kv_bytes`). `max_queue` requests (and calls) may wait; more are
refused with `QueueFull` (a server answers 429/503).
"""

from __future__ import annotations

import itertools
import queue
from concurrent.futures import Future
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..cache.batch import BatchCache, bytes_per_row
from ..cache.kv import RESERVE
from ..errors import InputError, QueueFull
from ..inputs import ModelInputs
from ..lora.inject import selection
from .engine import Engine, Session, prompt_keys
from .sampling import Sampler, SamplingParams
from .speculative import speculative_round
from .stream import Completion, Delta, Reply, RowText, Timings, collect


class Request:
    """One submitted conversation: iterate it for its deltas (the last has finish_reason)."""

    def __init__(self, rid: int, inputs: dict, params: SamplingParams, prompt_tokens: int, constraint=None,
                 session: Session | None = None, embeds: torch.Tensor | None = None,
                 adapter: str | None = None, adapter_tag: tuple | None = None):
        self.id, self.inputs, self.params = rid, inputs, params
        self.adapter, self.adapter_tag = adapter, adapter_tag  # its LoRA adapter (None: the base)
        self.constraint = constraint  # a grammar (generate/grammar.py: allowed(), advance()) or None
        self.session = session  # its row is saved back here when the reply is done
        self.embeds = embeds  # the prompt's input embeddings, when the caller already has them
        self.prompt_tokens = prompt_tokens
        self.submitted = time.perf_counter()
        self.cancelled = False
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        """Stop generating (a client went away); the row and its cache are freed at the next step."""
        self.cancelled = True

    def ready(self) -> list:
        """The deltas (or the exception) handed out so far and not yet taken; never blocks."""
        items = []
        while True:
            try:
                items.append(self._deltas.get_nowait())
            except queue.Empty:
                return items

    def __iter__(self):
        while True:
            item = self._deltas.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def result(self) -> Completion:
        return collect(iter(self))


@dataclass
class Running:
    """A request in the decode batch (its row's index is its place in `Scheduler.running`)."""
    request: Request
    reply: Reply

    @property
    def timings(self) -> Timings:
        return self.reply.timings


class Scheduler:
    def __init__(self, engine: Engine, *, max_seqs: int = 8, max_len: int | None = None,
                 max_queue: int = 64, reserve: int = RESERVE, prefix_cache_mb: float | None = None):
        """reserve: the batch rings' spare slots (cache/kv.py RESERVE): a speculative verify
        forward writes at most `reserve - 1` drafts and its x. prefix_cache_mb: automatic
        prefix caching (cache/prefix.py) in a store of this many MiB (0: off; None: the
        engine's store, if it has one). The batch stores K/V as the engine's caches do
        (Engine.kv_cache_dtype / kv_quant_layers): its rows are prefilled there."""
        self.engine = engine
        m = engine.model
        self.max_len = min(max_len or engine.context, engine.context)
        self.max_seqs, self.max_queue = max_seqs, max_queue
        with torch.inference_mode():
            self.cache = BatchCache(m.config.text, max_seqs, self.max_len, m.dtype, m.device, reserve,
                                    engine.kv_cache_dtype, engine.kv_quant_layers)
        self.kv_bytes = max_seqs * bytes_per_row(m.config.text, self.max_len, m.dtype, reserve,
                                                 engine.kv_cache_dtype, engine.kv_quant_layers)
        self.sampler = Sampler([], m.config.text.vocab_size, m.device, eos_ids=sorted(engine.base_stop_ids))
        self.running: list[Running] = []
        self.h = torch.zeros(0, m.config.text.hidden_size, dtype=m.dtype, device=m.device)  # [n, hidden]
        self.waiting: deque[Request] = deque()
        self.jobs: deque[tuple[Future, object, tuple]] = deque()  # call(): run between two steps
        self.prefilling: tuple[Request, object] | None = None
        self.tokens_out = 0  # completion tokens produced so far (metrics)
        self.solo: tuple[int, torch.Tensor] | None = None  # speculating: (emitted token not yet fed, its hidden)
        self.drafted = self.accepted = 0  # speculative totals (metrics)
        self.prefix = engine.prefix_cache if prefix_cache_mb is None else engine.make_prefix_cache(prefix_cache_mb)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- submitting (any thread) -------------------------------------------------------------
    def submit(self, inputs: dict, params: SamplingParams | None = None, constraint=None, *,
               session: Session | None = None, embeds: torch.Tensor | None = None,
               adapter: str | None = None) -> Request:
        """Queue one conversation. constraint: a grammar whose mask each of its steps samples
        under. session: a chat whose cached prefix is reused and which keeps this turn's cache.
        embeds [1, S, hidden]: the prompt already embedded (media need not be passed again).
        adapter: the LoRA adapter it runs under (default: the model's active one, if any)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise InputError(f"submit takes one conversation (input_ids [1, S]), got {list(ids.shape)}")
        n = ids.shape[1]
        if params.logit_bias and params.logit_bias[-1][0] >= self.sampler.vocab_size:  # sorted by id
            raise InputError(f"logit_bias: token id {params.logit_bias[-1][0]} is outside the vocabulary "
                             f"(0..{self.sampler.vocab_size - 1})")
        if n >= self.max_len:
            raise InputError(f"the prompt is {n} tokens; at most {self.max_len - 1} fit with room for a reply")
        sel = selection(self.engine.model, create=False)
        if sel is not None:
            adapter = adapter if adapter is not None else sel.active
            if adapter is not None and adapter not in sel.names:
                raise InputError(f"no LoRA adapter named {adapter!r} is loaded")
        elif adapter is not None:
            raise InputError(f"no LoRA adapter named {adapter!r} is loaded (the model has none)")
        tag = sel.tag(adapter) if sel is not None else None
        with self._lock:
            if len(self.waiting) + len(self.jobs) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting) + len(self.jobs)} requests are already waiting; try again later")
            request = Request(next(self._ids), inputs, params, n, constraint, session, embeds, adapter, tag)
            self.waiting.append(request)
            self._wake.notify()
        return request

    def call(self, fn, *args, adapter: str | None = None) -> Future:
        """fn(*args) on the scheduler's thread, between two steps (under inference mode); its
        result or exception in the returned Future. Without a running thread, here and now.
        adapter: the LoRA adapter its forwards run under (default: the model's active one)."""
        future: Future = Future()
        fn = self._under(adapter, fn)
        if not self.is_alive:
            self._run(future, fn, args)
            return future
        with self._lock:
            if len(self.waiting) + len(self.jobs) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting) + len(self.jobs)} requests are already waiting; try again later")
            self.jobs.append((future, fn, args))
            self._wake.notify()
        return future

    def _under(self, adapter: str | None, fn):
        """fn with every row of its forwards under `adapter` (the active one when None)."""
        sel = selection(self.engine.model, create=False)
        if sel is None:
            return fn
        name = adapter if adapter is not None else sel.active

        def run(*args):
            sel.set_rows(None)
            previous, sel.active = sel.active, name
            try:
                return fn(*args)
            finally:
                sel.active = previous
        return run

    def _select(self, rows: list[Request]) -> None:
        """The LoRA adapter of each batch row for the next forward (no-op without adapters)."""
        sel = selection(self.engine.model, create=False)
        if sel is not None:
            sel.set_rows([r.adapter for r in rows])

    def adapter_in_use(self, name: str) -> bool:
        """Whether a waiting, prefilling or running request runs under adapter `name`."""
        with self._lock:
            waiting = list(self.waiting)
        busy = waiting + [run.request for run in self.running] + ([self.prefilling[0]] if self.prefilling else [])
        return any(r.adapter == name for r in busy)

    @staticmethod
    @torch.inference_mode()
    def _run(future: Future, fn, args) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except Exception as e:  # the caller's to handle (a bad prompt, ...); the batch is untouched
                future.set_exception(e)

    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                if not self.jobs:
                    return
                future, fn, args = self.jobs.popleft()
            self._run(future, fn, args)

    def stats(self) -> dict:
        """Queue depth, running rows, KV use: what a metrics endpoint shows."""
        used = sum(self.cache.host_lengths[:self.cache.n])
        return {"waiting": len(self.waiting), "prefilling": int(self.prefilling is not None),
                "running": len(self.running), "max_seqs": self.max_seqs,
                "kv_tokens_used": used, "kv_tokens_total": self.max_seqs * self.max_len,
                "kv_bytes": self.kv_bytes, "completion_tokens": self.tokens_out,
                "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                **(self.prefix.stats() if self.prefix is not None else {})}

    # -- the background thread ---------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="unigemma-scheduler", daemon=True)
            self._thread.start()
        return self

    @property
    def is_alive(self) -> bool:
        """The background thread is running (a health check)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            jobs, self.jobs = list(self.jobs), deque()
        for future, _, _ in jobs:
            future.cancel()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.has_work():
                    self._wake.wait()
                if self._stop:
                    return
            self.step()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self.jobs)

    def run_until_done(self) -> None:
        """Step on this thread until nothing is waiting or running (tests, offline batches)."""
        while self.has_work():
            self.step()

    def drive(self, request: Request):
        """Step on this thread, yielding `request`'s deltas as they come (a caller-thread stream)."""
        while True:
            for item in request.ready():
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
            if not self.has_work():
                raise RuntimeError(f"request {request.id} has no finished reply and nothing is left to run")
            self.step()

    # -- one scheduler step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        try:
            self._step()
        finally:  # forwards outside the scheduler (model.logits, the embedders) see the active adapter
            sel = selection(self.engine.model, create=False)
            if sel is not None:
                sel.set_rows(None)

    def _step(self) -> None:
        self._run_jobs()
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
            self.cache = BatchCache(c.config, c.rows, c.max_len, self.h.dtype, self.h.device, c.reserve,
                                    c.kv_dtype, c.quant_layers)
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
            # A one-sequence cache for the prompt, copied into the batch once it is in; a
            # session's cache is the one it keeps, so it is sized for the reply too.
            max_len = self.max_len if request.session is not None else request.prompt_tokens
            steps = self.engine.prefill_steps(request.inputs, [request.params], request.session,
                                              max_len=max_len, embeds=request.embeds, prefix=self.prefix,
                                              adapter=request.adapter_tag)
            self.prefilling = (request, steps)
        request, steps = self.prefilling
        try:
            self._select([request])
            next(steps)
            return  # one chunk per step
        except StopIteration as done:
            cache, h, cached = done.value
        except Exception as e:  # bad media, ...: this request fails, the others go on
            self.prefilling = None
            request._deltas.put(e)
            return
        self.prefilling = None
        try:
            self._admit(request, cache, h, cached)
        except Exception as e:  # the batch is half-updated: fail its rows (and this one), start afresh
            for run in self.running:
                if run.request is not request:
                    run.request._deltas.put(e)
            request._deltas.put(e)
            self._reset()

    def _admit(self, request: Request, cache, h: torch.Tensor, cached: int) -> None:
        self.cache.insert(cache)
        ids = request.inputs["input_ids"][0]
        mask = request.inputs.get("attention_mask")
        self.sampler.add(request.params, ids if mask is None else ids[mask[0].bool()])
        text = RowText(self.engine.tokenizer, request.params, self.engine.stop_ids(request.params))
        timings = Timings(prompt_tokens=request.prompt_tokens, cached_tokens=cached,
                          prefill_s=time.perf_counter() - request.submitted)
        self.running.append(Running(request, Reply(text, timings, request.submitted)))
        self.h = torch.cat([self.h, h.to(self.h.dtype)])

    def _decode_step(self) -> None:
        keep = self._sample_and_emit()
        if self.running:
            self._select([run.request for run in self.running])
            tokens = self._last[keep][:, None]
            self.h = self.engine.decode_step(self.engine.model, self.cache, tokens, self.cache.positions[:, None])[:, -1]

    def _sample_and_emit(self) -> list[int]:
        """Sample every row's next token from self.h, hand out the deltas, free finished rows.
        Returns the old index of each remaining row (their tokens: self._last[keep])."""
        m = self.engine.model
        self._select([run.request for run in self.running])  # an adapter on the LM head
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
        deltas = []
        for r, run in enumerate(self.running):
            full = self.cache.host_lengths[r] >= self.max_len  # this token is the row's last
            deltas.append(run.reply.emit(host[r], lps[r] if run.request.params.logprobs else None, now, full))
            self.tokens_out += 1
        self._last = out.tokens
        return self._hand_out(deltas)

    def _hand_out(self, deltas: list[list[Delta]]) -> list[int]:
        """Deltas per running row to their requests; finished rows are saved (sessions) and
        freed. Returns the old index of each remaining row."""
        finished = [r for r, run in enumerate(self.running) if run.reply.finished]
        for r in finished:  # before the last delta is out: a chat's next turn may follow at once
            self._save(r)
            self._remember(r)
        for run, ds in zip(self.running, deltas):
            for d in ds:
                run.request._deltas.put(d)
        return self._remove_rows(finished)

    def _save(self, r: int) -> None:
        """A finished row of a chat session back into the session's cache: every token but the
        last sampled one (which was never fed), rolling back any speculative run past it."""
        run = self.running[r]
        session = run.request.session
        if session is None:
            return
        ids = run.reply.text.ids
        length = run.request.prompt_tokens + len(ids) - 1
        excess = self.cache.host_lengths[r] - length
        if excess > 0:
            self.cache.trim(excess, row=r)
        self.cache.save(r, session.cache)
        session.keys = session.keys[:run.request.prompt_tokens] + ids[:-1]

    def _remember(self, r: int) -> None:
        """A finished row's prompt and reply into the prefix cache: every token fed but the last
        sampled one (the next turn of an agent loop starts with them)."""
        run = self.running[r]
        if self.prefix is None or run.request.session is not None or run.request.embeds is not None:
            return
        ids = run.reply.text.ids
        fed = min(self.cache.host_lengths[r], run.request.prompt_tokens + len(ids) - 1)
        keys = prompt_keys(ModelInputs.coerce(run.request.inputs), self.engine.media_ids, run.request.adapter_tag) + ids
        self.prefix.remember(keys[:fed], self.cache, r)

    # -- speculative rounds for a request decoding alone ---------------------------------------
    def _can_speculate(self) -> bool:
        return (self.engine.proposer is not None and len(self.running) == 1 and not self.waiting
                and self.prefilling is None and self.running[0].request.constraint is None)

    def _leave_solo(self) -> None:
        x, _ = self.solo
        self.solo = None
        if self.running:
            m = self.engine.model
            self._select([run.request for run in self.running])
            tokens = torch.tensor([[x]], device=m.device)
            self.h = self.engine.decode_step(m, self.cache, tokens, self.cache.positions[:, None])[:, -1]

    def _speculative_step(self) -> None:
        """One round for row 0: draft k tokens after x, verify [x, drafts] in one forward, keep
        the accepted ones and the target's own next token (generate/speculative.py)."""
        if self.solo is None:  # entering: sample x as a batch step would, then hold it unfed
            keep = self._sample_and_emit()
            if not self.running:
                return
            self.solo = (int(self._last[keep][0]), self.h)
        e, c = self.engine, self.cache
        x, h_prev = self.solo
        run = self.running[0]
        room = min(self.max_len - c.host_lengths[0] - 1, c.reserve - 2)  # drafts that fit behind x
        if room < 1:  # no room left to draft: back to plain steps
            self._leave_solo()
            return self._decode_step()
        p = run.request.params
        # a seeded sampled request drafts the fixed k: the adaptive choice follows wall-clock timings,
        # and which random draws each position takes depends on the draft lengths
        seeded = p.seed is not None and p.temperature > 0
        k = min(e.draft.k if seeded else e.draft.next(), room)
        self._select([run.request])
        got, h_next = speculative_round(e.model, e.proposer, e.draft, c, self.sampler, x, h_prev, k,
                                        p.top_logprobs if p.logprobs else None, e.decode_step)
        kept = len(got.tokens) - 1
        t = run.timings
        t.drafted, t.accepted, t.verify_forwards = t.drafted + k, t.accepted + kept, t.verify_forwards + 1
        self.drafted, self.accepted = self.drafted + k, self.accepted + kept
        now = time.perf_counter()
        deltas = []
        for j, (token, lp) in enumerate(zip(got.tokens, got.logprobs)):  # a stop may come before the run's end
            full = j == kept and c.host_lengths[0] >= self.max_len
            deltas += run.reply.emit(token, lp if p.logprobs else None, now, full)
            self.tokens_out += 1
            if run.reply.finished:
                break
        self._hand_out([deltas])
        if self.running:
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
