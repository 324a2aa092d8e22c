"""Minimal greedy generation over the KV cache: the oracle for the engine to come.

One prefill of the whole prompt, then one token per step. Positions follow transformers'
`generate()`: the count of real (non-padding) tokens before each token, so a left-padded row
decodes exactly as it would alone. Finished rows keep emitting the pad token.
"""

from __future__ import annotations

import torch

from ..models.base import CausalLM, check_ids
from .runner import decode_step


@torch.inference_mode()
def greedy_generate(model: CausalLM, input_ids, attention_mask=None, max_new_tokens: int = 32,
                    stop_ids=None, mm_token_type_ids=None, **media) -> torch.Tensor:
    """input_ids [B, S] (left padded) → new token ids [B, n ≤ max_new_tokens]."""
    input_ids = check_ids(input_ids, model.config.text.vocab_size).to(model.device)
    B, S = input_ids.shape
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(model.device)).bool()
    stop = torch.tensor(model.config.stop_token_ids if stop_ids is None else list(stop_ids), device=model.device)
    pad = model.config.text.pad_token_id
    cache = model.make_cache(B, S + max_new_tokens)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    h = model(input_ids, positions, attention_mask=mask, mm_token_type_ids=mm_token_type_ids, cache=cache, **media)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=model.device)
    for step in range(max_new_tokens):
        tok = model.head(h[:, -1]).argmax(-1)
        tok = torch.where(done, pad, tok)
        out.append(tok)
        done |= torch.isin(tok, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        h = decode_step(model, cache, tok[:, None], cache.positions[:, None])
    return torch.stack(out, dim=1)
