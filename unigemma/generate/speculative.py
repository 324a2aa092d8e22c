"""Speculative decoding: a drafter proposes k tokens, the target checks them in one forward.

One round, for one conversation whose cache holds every token but the last sampled one, x:

    1. propose   d1..dk: the MTP drafter runs k steps at x's position over the target's own
                 K/V (models/drafter.py), each step reading the token the last one proposed
    2. verify    one target forward over [x, d1..dk] -> logits L0..Lk
    3. accept    greedy: keep d_i while it is the target's argmax after L_{i-1}; the first
                 mismatch is replaced by the target's token. Sampling: keep d_i with
                 probability min(1, p_i(d_i) / q_i(d_i)), else draw from norm(max(0, p_i - q_i))
                 and stop (Leviathan et al. 2023): the output is distributed exactly as the
                 target's own samples. All k kept -> one more token from L_k.
    4. roll back the rejected drafts' K/V (cache.trim; sliding rings keep `reserve` spare
                 slots for this, and the drafter's next round only reads accepted tokens)

p_i is the target's distribution after the request's own processing (penalties, masks,
temperature, top-k/p, min-p: the Sampler's), q_i the drafter's through the same processing.
Each emitted token is counted in the sampler's history before the next position is judged, so
penalties see exactly what plain decoding would. `DraftLength` picks k per round from the
measured acceptance and the measured cost of a draft step relative to a verify forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..cache.kv import KEY_BLOCK
from ..config import FULL, SLIDING
from ..errors import InputError
from ..models.drafter import Drafter
from ..models.base import CausalLM
from .runner import Step, decode_step
from .sampling import Sampler


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None  # [k, V] the drafter's distributions (None: greedy drafting)


class MTPProposer:
    """Drafts with the MTP drafter over the target's KV cache."""

    def __init__(self, target: CausalLM, drafter: Drafter):
        drafter.config.check_target(getattr(target, "full_config", target.config).text)  # (a TP shard: 1/N of the heads)
        self.target, self.drafter = target, drafter
        types = target.config.text.layer_types
        # the target layer each drafter layer type reads: the last one of that type
        self.source = {t: max(i for i, lt in enumerate(types) if lt == t) for t in (SLIDING, FULL)}
        self.window = target.config.text.sliding_window

    def shared_kv(self, cache) -> dict:
        """The target's K/V the drafter's query at position p = cache.length may see: every
        cached token on full layers, the last window + 1 on sliding ones (as the reference's
        bidirectional window mask lets it), and never a rolled-back draft (those slots are -1).
        The conversation is row 0 (a one-sequence cache, or a batch with one row running)."""
        p = cache.length
        kv = {}
        for t, layer in self.source.items():
            k, v, idx = cache.kv_for(layer, row=0)
            used = min(idx.shape[0], -(-p // KEY_BLOCK) * KEY_BLOCK)  # slots fill from 0 until a ring wraps
            k, v, idx = k[:, :, :used], v[:, :, :used], idx[:used]
            seen = idx >= 0
            if t == SLIDING:
                seen &= idx >= p - 1 - self.window
            kv[t] = (k, v, seen.view(1, 1, 1, -1))
        return kv

    @torch.inference_mode()
    def propose(self, cache, x: int, h: torch.Tensor, k: int, sampler: Sampler) -> Proposal:
        """k draft tokens after x; h [1, hidden] the target's hidden that produced x."""
        kv = self.shared_kv(cache)
        pos = torch.full((1, 1), cache.length, device=h.device)
        greedy = bool(sampler.greedy[0])
        tokens, qs = [], []
        tok = torch.tensor([[x]], device=h.device)
        hid = h.view(1, 1, -1)
        d = self.drafter
        for _ in range(k):
            emb = self.target.text.embed(tok)  # the target's table, ×√hidden
            y = d.body(emb, hid, pos, kv)
            hid = d.post_projection(y)
            if greedy and sampler.plain:  # nothing to mask or penalise: the argmax alone
                tok = d.top_token(y[:, -1])[:, None]
                tokens.append(int(tok))
                continue
            z = sampler.process(d.logits(y)[:, -1].float())
            if greedy:
                tok = z.argmax(-1, keepdim=True)
            else:
                q = sampler.probs(z)
                qs.append(q[0])
                tok = sampler.draw(q)[:, None]
            tokens.append(int(tok))
        return Proposal(tokens, torch.stack(qs) if qs else None)


@dataclass
class Accepted:
    tokens: list[int]  # the drafts kept, then the target's own token
    logprobs: list[dict | None]
    drafted: int


def accept(sampler: Sampler, logits: torch.Tensor, proposal: Proposal, top: int | None) -> Accepted:
    """Judge a proposal against the target's logits [k + 1, V] (one conversation).
    Every emitted token is observed by the sampler before the next position is judged."""
    drafts = proposal.tokens
    greedy = bool(sampler.greedy[0])
    out, lps = [], []
    for i in range(len(drafts) + 1):
        x = sampler.process(logits[i:i + 1].float())
        if greedy:
            t = int(x.argmax(-1))
            stop = i == len(drafts) or t != drafts[i]
        else:
            p = sampler.probs(x)
            if i == len(drafts):
                t, stop = int(sampler.draw(p)), True
            else:
                d, q = drafts[i], proposal.q[i]
                ratio = (p[0, d] / q[d].clamp(min=torch.finfo(torch.float32).tiny)).clamp(max=1.0)
                if float(sampler.uniform()[0]) < float(ratio):
                    t, stop = d, False
                else:
                    residual = (p[0] - q).clamp(min=0)
                    if float(residual.sum()) <= 0:  # p == q up to rounding: p itself is the residual
                        residual = p[0]
                    t, stop = int(sampler.draw((residual / residual.sum())[None])), True
        out.append(t)
        lps.append(_logprob(x, t, top))
        sampler.observe(torch.tensor([t], device=sampler.device))
        if stop:
            break
    return Accepted(out, lps, len(drafts))


def _logprob(x: torch.Tensor, t: int, top: int | None) -> dict | None:
    if top is None:
        return None
    lp = x[0].log_softmax(-1)
    vals, ids = lp.topk(top) if top else (lp[:0], lp[:0].long())
    return {"token_id": t, "logprob": float(lp[t]), "top": list(zip(ids.tolist(), vals.tolist()))}


@dataclass
class DraftLength:
    """k per round. Fixed (`adaptive=False`), or chosen to maximise expected tokens per unit of
    time, 0 included: k = 0 is a plain one-token step, so drafting turns itself off where drafts
    do not pay (low acceptance, or a verify that costs more per row than a draft saves: the int8
    activation kernels' cost grows with rows) and comes back when they do.

    With acceptance a per draft (running estimate), a round of k drafts yields
    (1 - a^(k+1)) / (1 - a) tokens and takes 1 + k * (cost + marginal) plain steps: `cost` a
    draft step and `marginal` each extra verified row, both measured relative to the plain step
    (`plain_s`, measured in k = 0 rounds). Every `probe` rounds the choice not taken runs once
    (a plain step while drafting, a draft round while off), so the estimates stay current."""
    k: int = 4
    adaptive: bool = True
    max_k: int = 8
    probe: int = 16
    rate: float = 0.6  # running acceptance per drafted token
    cost: float = 0.1  # draft step time / plain step time
    marginal: float = 0.05  # extra verify time per drafted row / plain step time
    plain_s: float | None = None  # one plain step (forward + head), seconds
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    since_probe: int = 0
    history: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("k", "max_k", "probe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"draft {name} must be a positive integer, got {v!r}")

    def gain(self, k: int) -> float:
        """Expected tokens per plain-step time of a k-draft round (plain decoding: 1)."""
        a = min(max(self.rate, 0.01), 0.99)
        return (1 - a ** (k + 1)) / (1 - a) / (1 + k * (self.cost + self.marginal))

    def next(self) -> int:
        if not self.adaptive:
            return self.k
        best = max(range(1, self.max_k + 1), key=self.gain)
        choice = best if self.gain(best) > 1.0 else 0
        self.since_probe += 1
        if self.plain_s is None or self.since_probe >= self.probe:  # measure the other side once
            self.since_probe = 0
            choice = best if choice == 0 and self.plain_s is not None else 0
        self.history.append(choice)
        return choice

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """One round's figures: verify_s is the verify forward and its head (for k = 0: a plain step)."""
        self.drafted += drafted
        self.accepted += accepted
        self.rounds += 1
        if not drafted:
            self.plain_s = verify_s if self.plain_s is None else 0.8 * self.plain_s + 0.2 * verify_s
            return
        self.rate = 0.8 * self.rate + 0.2 * (accepted / drafted)
        if self.plain_s:
            self.cost = 0.8 * self.cost + 0.2 * (draft_s / drafted / self.plain_s)
            extra = max(0.0, verify_s - self.plain_s) / drafted / self.plain_s
            self.marginal = 0.8 * self.marginal + 0.2 * extra

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def speculative_round(model, proposer: MTPProposer, draft: DraftLength, cache, sampler: Sampler, x: int,
                      h: torch.Tensor, k: int, top: int | None,
                      step: Step = decode_step) -> tuple[Accepted, torch.Tensor]:
    """One round for one conversation (row 0 of its cache): draft k tokens after x (h: the
    hidden that produced x), verify [x, drafts] in one forward (`step`: generate/runner.py),
    accept, roll the rejected drafts back. Returns what was accepted and the hidden that
    produced its last token (the next round's h); the cache then holds everything but that
    last token."""
    proposal, draft_s = timed(proposer.propose, cache, x, h, k, sampler) if k else (Proposal([], None), 0.0)
    run = torch.tensor([[x] + proposal.tokens], device=model.device)
    positions = cache.positions[:, None] + torch.arange(k + 1, device=model.device)

    def verify():
        H = step(model, cache, run, positions)[0]
        return H, model.head(H)

    (H, logits), verify_s = timed(verify)
    got = accept(sampler, logits, proposal, top)
    kept = len(got.tokens) - 1
    cache.trim(k - kept, row=0)
    draft.update(k, kept, draft_s, verify_s)
    return got, H[kept:kept + 1]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


__all__ = ["MTPProposer", "Proposal", "Accepted", "accept", "DraftLength", "speculative_round", "timed"]
