"""Scoring a prompt: each token's log-probability given the tokens before it.

    entries = prompt_logprobs(model, ids, top=5)   # [None, {"token_id", "logprob", "top": [(id, lp)]}, ...]

What /v1/completions with `echo` and `logprobs` returns for the prompt (lm-eval-harness'
log-likelihoods). The first token has no context, so no logprob (None, as OpenAI gives). The
prompt runs in chunks through a cache of its own, and the head in slices of `HEAD_ROWS`
positions, so memory stays at one chunk's activations plus HEAD_ROWS x vocab logits (32 MiB at
a 262k vocabulary in float32) whatever the prompt's length. Logprobs are the model's own
(softcapped logits, no temperature or penalties), the same entries the sampler hands out.

Run it where the model may be used: a server hands it to `Scheduler.call` (the scheduler's thread).
"""

from __future__ import annotations

import torch

HEAD_ROWS = 32


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], top: int = 0, chunk: int = 512) -> list[dict | None]:
    """ids: one prompt (text only). top: alternatives per position (0..20)."""
    S = len(ids)
    x = torch.tensor([ids], dtype=torch.long, device=model.device)  # [1, S]
    positions = torch.arange(S, device=model.device)[None]
    cache = model.make_cache(1, S)
    out: list[dict | None] = [None]
    for a in range(0, S - 1, chunk):  # the last position predicts no prompt token
        b = min(a + chunk, S - 1)
        h = model(x[:, a:b], positions[:, a:b], cache=cache, require_media=False)[0]  # [b - a, hidden]
        for i in range(0, b - a, HEAD_ROWS):
            lp = model.head(h[i:i + HEAD_ROWS]).float().log_softmax(-1)  # [rows, vocab]
            targets = x[0, a + i + 1:a + i + 1 + lp.shape[0]]  # position p predicts token p + 1
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
            top_lp, top_ids = lp.topk(top, -1) if top else (lp[:, :0], lp[:, :0].long())
            for t, c, ti, tl in zip(targets.tolist(), chosen, top_ids.tolist(), top_lp.tolist()):
                out.append({"token_id": t, "logprob": c, "top": list(zip(ti, tl))})
    return out[:S]
