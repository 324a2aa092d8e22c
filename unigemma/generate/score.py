"""Scoring a prompt: each token's log-probability given the tokens before it.

    entries = prompt_logprobs(model, ids, top=5)   # [None, {"token_id", "logprob", "top": [(id, lp)]}, ...]

What /v1/completions with `echo` and `logprobs` returns for the prompt (lm-eval-harness'
log-likelihoods). The first token has no context, so no logprob (None, as OpenAI gives). The
prompt runs in chunks through a cache of its own, and the head in slices of `HEAD_ROWS`
positions, so memory stays at one chunk's activations plus HEAD_ROWS x vocab logits (32 MiB at
a 262k vocabulary in float32) whatever the prompt's length. Logprobs are the model's own
(softcapped logits, no temperature or penalties), the same entries the sampler hands out.

Run it where the model may be used. A server steps a `PromptScorer` one chunk per
`Scheduler.call` (the scheduler's thread), so decoding streams wait one chunk, not a whole prompt.
"""

from __future__ import annotations

import torch

HEAD_ROWS = 32


class PromptScorer:
    """`prompt_logprobs` one chunk per `step()`; `entries` once a step returned True."""

    def __init__(self, model, ids: list[int], top: int = 0, chunk: int = 512):
        self.model, self.ids, self.top, self.chunk = model, ids, top, chunk
        self.entries: list[dict | None] = [None]
        self.done_to = 0  # prompt positions run so far
        self.cache = None

    @torch.inference_mode()
    def step(self) -> bool:
        """Run the next chunk; True when the whole prompt is scored."""
        m, S = self.model, len(self.ids)
        if self.cache is None:
            self.x = torch.tensor([self.ids], dtype=torch.long, device=m.device)  # [1, S]
            self.positions = torch.arange(S, device=m.device)[None]
            self.cache = m.make_cache(1, S)
        a = self.done_to
        b = min(a + self.chunk, S - 1)  # the last position predicts no prompt token
        if a < b:
            h = m(self.x[:, a:b], self.positions[:, a:b], cache=self.cache, require_media=False)[0]  # [b - a, hidden]
            for i in range(0, b - a, HEAD_ROWS):
                self._score(h[i:i + HEAD_ROWS], a + i)
        self.done_to = b
        if b >= S - 1:
            self.cache = None  # freed at once, not when the caller drops the scorer
            return True
        return False

    def _score(self, h: torch.Tensor, p: int) -> None:
        lp = self.model.head(h).float().log_softmax(-1)  # [rows, vocab]
        targets = self.x[0, p + 1:p + 1 + lp.shape[0]]  # position p predicts token p + 1
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        if self.top:
            top_lp, top_ids = lp.topk(self.top, -1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
        else:
            tops = [[] for _ in chosen]
        for t, c, top in zip(targets.tolist(), chosen, tops):
            self.entries.append({"token_id": t, "logprob": c, "top": top})


def prompt_logprobs(model, ids: list[int], top: int = 0, chunk: int = 512) -> list[dict | None]:
    """ids: one prompt (text only). top: alternatives per position (0..20)."""
    scorer = PromptScorer(model, ids, top, chunk)
    while not scorer.step():
        pass
    return scorer.entries
