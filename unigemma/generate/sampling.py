"""Sampling: a batched sampler that stays on the device.

    sampler = Sampler([SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0)],
                      vocab_size, device, eos_ids=[1, 106])
    sampler.observe_prompt(0, prompt0); sampler.observe_prompt(1, prompt1)
    out = sampler.sample(logits)      # [B, V] -> out.tokens [B]
    sampler.observe(out.tokens)       # before the next step: penalties and min_tokens count it

`sample` never reads a tensor back to the host (no .item(), .tolist(), or branches on tensor
values): every choice it makes on the host comes from the requests' parameters, so it can sit
inside a decode step without a sync (it is not made for CUDA-graph capture: each sampled row
draws its noise from its own generator, one small kernel per row). Per step it applies, in order:
logit_bias -> a grammar's mask -> suppress_tokens and min_tokens' stop-id mask ->
repetition/presence/frequency penalties ->
temperature -> top-k -> top-p -> min-p -> one draw per row.

Logprobs are "processed-before-temperature": log_softmax of the logits after the masks and
penalties, before temperature and truncation. That is what the model scores under the
request's hard constraints; temperature and top-k/p/min-p only shape the draw (applying them
would make most alternatives -inf and the numbers depend on T). With no penalties or masks they
are the model's raw log-probabilities.

Continuous batching: row r of the sampler is row r of the decode batch. `add(params,
prompt_ids)` appends a row and returns its index; `remove(row)` drops one and shifts the rows
after it down by one; `select(keep)` reorders and drops rows as `batch[keep]` would. Both run between steps; per-row
state on the device (step counts, token counts, masks) is concatenated or indexed, the small
parameter tensors are rebuilt from the host list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .params import MAX_TOP_LOGPROBS, SamplingParams  # noqa: F401 (re-exported)

__all__ = ["SamplingParams", "SampleOutput", "Sampler", "apply_penalties", "apply_temperature",
           "apply_top_k", "apply_top_p", "apply_min_p"]

NEG_INF = float("-inf")
# Below this temperature logits / T can overflow float32; such a row is greedy in all but name.
MIN_TEMPERATURE = 1e-5


# --- pure helpers on [B, V] float32 logits, per-row parameters as [B] tensors ---------------
def apply_penalties(logits, counts, seen, repetition, presence, frequency):
    """Repetition (CTRL/HF: divide positive, multiply negative logits of every token `seen` in
    the prompt or the output) then OpenAI presence/frequency over output `counts` [B, V]."""
    rep = repetition[:, None]
    seen = seen | (counts > 0)
    x = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    c = counts.to(x.dtype)
    return x - frequency[:, None] * c - presence[:, None] * (c > 0).to(x.dtype)


def apply_temperature(logits, temperature):
    """Divide by T; rows at T == 0 (greedy, decided elsewhere) are left unscaled."""
    t = torch.where(temperature > 0, temperature.clamp(min=MIN_TEMPERATURE), 1.0)
    return logits / t[:, None]


def apply_top_k(logits, k, max_k: int | None = None):
    """Keep each row's k largest logits (ties with the k-th are kept too); k <= 0 keeps all.
    max_k: a known bound on k (every row on): a top-k of that size replaces the full sort."""
    V = logits.shape[-1]
    k = torch.where(k <= 0, V, k).clamp(max=V)
    if max_k is not None and 0 < max_k < V:
        ranked = logits.topk(max_k, dim=-1).values
        k = k.clamp(max=max_k)
    else:
        ranked = logits.sort(dim=-1, descending=True).values
    kth = ranked.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits, p):
    """Keep the smallest set of most likely tokens whose probability reaches p (the nucleus);
    the most likely token always stays, and p >= 1 keeps everything."""
    ranked, order = logits.sort(dim=-1, descending=True)
    probs = ranked.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = (before >= p[:, None]) & (p < 1)[:, None]  # p == 1 must not lose to rounding
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)


def apply_min_p(logits, min_p):
    """Drop tokens whose probability is below min_p times the row's largest probability."""
    probs = logits.softmax(-1)
    floor = probs.amax(-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < floor, NEG_INF)


# --- the sampler ------------------------------------------------------------------------
@dataclass
class SampleOutput:
    """One step's draw. logprobs/top_* are None when no row asked for logprobs; top_* hold
    the batch's largest top_logprobs columns (rows asking fewer use a prefix)."""
    tokens: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None = None  # [B] float32, of the sampled token
    top_ids: torch.Tensor | None = None  # [B, K] long, most likely first
    top_logprobs: torch.Tensor | None = None  # [B, K] float32
    wants: tuple = ()  # per row: None (no logprobs) or how many alternatives it asked for

    def host_logprobs(self) -> list[dict | None]:
        """Per row {"token_id", "logprob", "top": [(id, logprob)]}, or None: one host sync."""
        if self.logprobs is None:
            return [None] * len(self.wants)
        tokens, lps = self.tokens.tolist(), self.logprobs.tolist()
        ids, tops = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [None if k is None else {"token_id": tokens[r], "logprob": lps[r],
                                        "top": list(zip(ids[r][:k], tops[r][:k]))}
                for r, k in enumerate(self.wants)]


class Sampler:
    """Samples a batch of rows, each with its own SamplingParams, seed and token history.

    eos_ids: the model's stop ids; with each row's stop_token_ids (and without them where it
    sets ignore_eos) they are what min_tokens keeps from being sampled."""

    def __init__(self, params_list, vocab_size: int, device="cpu", eos_ids=()):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise InputError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.eos_ids = tuple(self._check_ids("eos_ids", eos_ids))
        self.params: list[SamplingParams] = []
        self._generators: list[torch.Generator | None] = []
        self.steps = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens observed per row
        # [B, V] state, allocated only once some row needs it (most requests need none):
        self.counts = self.seen = None  # output token counts (int32), prompt tokens seen (bool)
        self.banned = self.stops = None  # suppress_tokens, stop ids masked before min_tokens (bool)
        self.bias = None  # logit_bias (float32)
        for p in params_list:
            self._append(p)
        self._refresh()

    def __len__(self) -> int:
        return len(self.params)

    # -- rows joining and leaving ----------------------------------------------------------
    def add(self, params: SamplingParams, prompt_ids=None) -> int:
        """Append a row (between steps); returns its index."""
        self._append(params)
        self._refresh()
        row = len(self.params) - 1
        if prompt_ids is not None:
            self.observe_prompt(row, prompt_ids)
        return row

    def remove(self, row: int) -> None:
        """Drop a row; the rows after it move down by one."""
        self._check_row(row)
        self.select([r for r in range(len(self.params)) if r != row])

    def select(self, keep: list[int]) -> None:
        """Keep these rows, in this order (as `batch[keep]` does to a decode batch)."""
        for r in keep:
            self._check_row(r)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for name in ("steps", "counts", "seen", "banned", "stops", "bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))
        self.params = [self.params[r] for r in keep]
        self._generators = [self._generators[r] for r in keep]
        self._refresh()

    def _check_row(self, row) -> None:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(self.params):
            raise InputError(f"row must be in [0, {len(self.params)}), got {row!r}")

    def _check_ids(self, field: str, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"{field} must be token ids in [0, {self.vocab_size}), got {bad[0]}")
        return ids

    def _grow(self, name: str, dtype) -> torch.Tensor:
        """The [B, V] tensor `name`, created as zeros for the rows so far if absent."""
        if getattr(self, name) is None:
            setattr(self, name, torch.zeros(len(self.params), self.vocab_size, dtype=dtype, device=self.device))
        return getattr(self, name)

    def _append(self, p: SamplingParams) -> None:
        if not isinstance(p, SamplingParams):
            raise InputError(f"params must be SamplingParams, got {type(p).__name__}")
        suppress = self._check_ids("suppress_tokens", p.suppress_tokens)
        stop_ids = self._check_ids("stop_token_ids", p.stop_token_ids)
        if p.has_penalties:
            self._grow("counts", torch.int32), self._grow("seen", torch.bool)
        if suppress:
            self._grow("banned", torch.bool)
        if p.min_tokens > 0:
            self._grow("stops", torch.bool)
        biased = self._check_ids("logit_bias", [i for i, _ in p.logit_bias])
        if biased:
            self._grow("bias", torch.float32)
        stops = stop_ids + ([] if p.ignore_eos else list(self.eos_ids))
        for name, ids in (("counts", []), ("seen", []), ("banned", suppress), ("stops", stops), ("bias", biased)):
            t = getattr(self, name)
            if t is not None:  # every [B, V] tensor that exists gets the new row
                row = t.new_zeros(1, self.vocab_size)
                if name == "bias" and ids:
                    row[0, ids] = torch.tensor([b for _, b in p.logit_bias], device=t.device)
                else:
                    row[0, ids] = 1
                setattr(self, name, torch.cat([t, row]))
        self.steps = torch.cat([self.steps, self.steps.new_zeros(1)])
        gen = None
        if not p.is_greedy:  # greedy rows draw no noise, so they need no generator
            gen = torch.Generator(device=self.device)
            gen.manual_seed(p.seed) if p.seed is not None else gen.seed()
        self.params.append(p)
        self._generators.append(gen)

    def _refresh(self) -> None:
        """Rebuild the per-row parameter tensors and the host-side flags from self.params."""
        ps, dev = self.params, self.device

        def col(attr, dtype=torch.float32):
            return torch.tensor([getattr(p, attr) for p in ps], dtype=dtype, device=dev)

        self.temperature, self.top_k, self.top_p, self.min_p = (
            col("temperature"), col("top_k", torch.long), col("top_p"), col("min_p"))
        self.repetition, self.presence, self.frequency = (
            col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty"))
        self.min_tokens = col("min_tokens", torch.long)
        self.greedy = torch.tensor([p.is_greedy for p in ps], dtype=torch.bool, device=dev)
        sampled = [p for p in ps if not p.is_greedy]
        self._any_sampled = bool(sampled)
        self._any_top_k = any(p.top_k > 0 for p in sampled)
        self._max_k = max(p.top_k for p in sampled) if sampled and all(p.top_k > 0 for p in sampled) else None
        self._any_top_p = any(p.top_p < 1 for p in sampled)
        self._any_min_p = any(p.min_p > 0 for p in sampled)
        self._wants = tuple(p.top_logprobs if p.logprobs else None for p in ps)
        self._max_top = max((k for k in self._wants if k is not None), default=None)

    # -- history ------------------------------------------------------------------------
    def observe_prompt(self, row: int, prompt_ids) -> None:
        """Record a row's prompt tokens for its repetition penalty (a no-op for other rows)."""
        self._check_row(row)
        if self.params[row].repetition_penalty == 1.0:
            return
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).to(self.device).reshape(-1)
        self.seen[row].index_fill_(0, ids, True)

    def observe(self, tokens: torch.Tensor) -> None:
        """Count one step's tokens [B] (the ones fed back to the model)."""
        self.steps += 1
        if self.counts is not None:
            tokens = tokens.to(self.device, torch.long)[:, None]
            self.counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.int32))

    # -- the draw -----------------------------------------------------------------------
    @property
    def plain(self) -> bool:
        """No row masks or penalises tokens: process() only casts to float32."""
        return self.banned is None and self.stops is None and self.counts is None and self.bias is None

    def process(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Masks and penalties: the float32 logits that logprobs and greedy rows use.
        allowed: [B, V] bool, the tokens each row may take (a grammar's mask), or None."""
        x = logits.float()
        if self.bias is not None:  # before the grammar's mask: a bias never revives a forbidden token
            x = x + self.bias
        if allowed is not None:
            x = x.masked_fill(~allowed.to(x.device), NEG_INF)
        if self.banned is not None or self.stops is not None:
            mask = self.banned if self.banned is not None else torch.zeros_like(self.stops)
            if self.stops is not None:
                mask = mask | (self.stops & (self.steps < self.min_tokens)[:, None])
            x = x.masked_fill(mask, NEG_INF)
        if self.counts is not None:
            x = apply_penalties(x, self.counts, self.seen, self.repetition, self.presence, self.frequency)
        return x

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The distribution each sampled row draws from, given processed logits x [B, V]:
        temperature -> top-k -> top-p -> min-p -> softmax (greedy rows: the same transforms,
        their draw is the argmax anyway). Speculative decoding compares these."""
        y = apply_temperature(x, self.temperature)
        if self._any_top_k:
            y = apply_top_k(y, self.top_k, self._max_k)
        if self._any_top_p:
            y = apply_top_p(y, self.top_p)
        if self._any_min_p:
            y = apply_min_p(y, self.min_p)
        return y.softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per sampled row from probs [B, V] (greedy rows: argmax).

        Exponential race: argmax(p / E), E ~ Exp(1) i.i.d., picks token i with probability
        p_i (Gumbel-max in another guise). Each row's noise comes from its own generator, so a
        row draws the same tokens whatever else shares the batch."""
        noise = torch.ones_like(probs)
        for r, gen in enumerate(self._generators):
            if gen is not None:
                noise[r].exponential_(generator=gen)
        return (probs / noise.clamp(min=torch.finfo(torch.float32).tiny)).argmax(-1)

    def uniform(self) -> torch.Tensor:
        """[B] uniform draws in [0, 1) from each sampled row's generator (greedy rows: 0)."""
        u = torch.zeros(len(self.params), device=self.device)
        for r, gen in enumerate(self._generators):
            if gen is not None:
                u[r : r + 1].uniform_(generator=gen)
        return u

    def sample(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> SampleOutput:
        """logits [B, V], any float dtype -> SampleOutput (tokens [B] long). allowed: optional
        [B, V] bool of the tokens each row may take (constrained decoding), built on the host
        from earlier steps' tokens, so applying it needs no sync."""
        if logits.dim() != 2 or logits.shape != (len(self.params), self.vocab_size):
            raise InputError(f"logits must be [{len(self.params)}, {self.vocab_size}], got {list(logits.shape)}")
        if allowed is not None and allowed.shape != logits.shape:
            raise InputError(f"allowed must be [{len(self.params)}, {self.vocab_size}], got {list(allowed.shape)}")
        x = self.process(logits, allowed)
        tokens = x.argmax(-1)
        if self._any_sampled:
            tokens = torch.where(self.greedy, tokens, self.draw(self.probs(x)))
        out = SampleOutput(tokens=tokens, wants=self._wants)
        if self._max_top is not None:
            lp = x.log_softmax(-1)
            out.logprobs = lp.gather(1, tokens[:, None])[:, 0]
            out.top_logprobs, out.top_ids = lp.topk(self._max_top, dim=-1)
        return out
