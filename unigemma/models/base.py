"""The model protocol every family shares (`CausalLM`, written once) and a family's record (`Family`).

The cached forward, in the order it runs:

    h = embed(ids, media)  or the `embeds` given     (the family's: text + soft tokens)
    steps = cache.begin(valid)                       (the cache plans where the new keys go)
    masks = masks(query index, steps' key index)     (causal, sliding window, padding, media blocks)
    h = text(h, positions, masks, cache)             (the family's block stack; abort on error)
    cache.end()
    logits = head(h)                                 (the head module, `output`; softcap)

A family subclasses `CausalLM` and supplies `text` (its block stack, models/text.py's
`TextModel` or alike), `embed` (a text-only family rejects media there) and, if its policy
differs, `masks`. The class owns the public signatures the engine, generators and loader call.
It knows nothing about checkpoint names, GGUF or quantization: a family module lists those in
its `Family` record, which the registry (models/__init__.py) holds.

The LM head is one module, `output`: `lm_head` where the model has one, else the tied embedding's
`linear` (which also serves a quantized table). An untied model's `lm_head` is its Linear; the CPU
fast path swaps in a packed module as `lm_head` for either kind (models/packed.py `swap_head`),
so `head` never asks whether the head is packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..cache.kv import KVCache
from ..config import FULL, SLIDING, ModelConfig
from ..errors import InputError
from .layers import softcap
from .masks import COMPOSITIONS, block_ids, make_mask


def check_ids(input_ids, vocab_size: int) -> torch.Tensor:
    """Token ids as given by a user ([S] or [B, S], any int container) → long [B, S], checked."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise InputError(f"input_ids must be integer token ids [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids is empty")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"input_ids hold token id {lo if lo < 0 else hi}, outside the vocabulary of {vocab_size}")
    return input_ids.long()


def identity(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Family:
    """What config parsing, the loaders, saving and quantization need from one model family."""

    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values it reads
    model: type  # a CausalLM subclass: model(config, block_mask="sliding")
    parse_config: Callable[[dict, str], ModelConfig]  # (config.json dict, model_type) → ModelConfig
    to_ours: Callable[[str, ModelConfig], str | None]  # on-disk tensor name → our name (None: not ours)
    to_disk: Callable[[str, ModelConfig], str]  # our name → on-disk tensor name
    is_quantizable: Callable[[str, nn.Module], bool]  # the modules a quantization scheme swaps
    tiny_config: Callable[[str], dict]  # model_type → a tiny config.json of this family (tests, demos)
    load_transform: Callable[[str, torch.Tensor], torch.Tensor] = identity  # on-disk value → ours (our name)
    save_transform: Callable[[str, torch.Tensor], torch.Tensor] = identity  # ours → on-disk value
    gguf_archs: tuple[str, ...] = ()  # llama.cpp `general.architecture` values it reads
    gguf_config: Callable | None = None  # (GGUF file, read(name) → float tensor) → config.json-style dict
    gguf_name: Callable[[str], str | None] | None = None  # llama.cpp tensor name → ours (None: not a weight)
    takes_media: bool = False  # its embed takes images / audio / video (and a GGUF mmproj)
    # its published chat template (unigemma/templates/<name>.jinja), for checkpoints that ship none
    chat_template: str | None = None


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, block_mask: str = "sliding"):
        super().__init__()
        if block_mask not in COMPOSITIONS:
            raise ValueError(f"block_mask must be one of {COMPOSITIONS}, got {block_mask!r}")
        self.config = config
        self.block_mask = block_mask  # how media blocks compose with layer types (masks.py)

    def add_head(self) -> None:
        """The untied LM head (a tied one reads the embedding: no `lm_head` until one is swapped
        in); called after the family's modules, so parameters keep the checkpoint's order."""
        if not self.config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.text.hidden_size, self.config.text.vocab_size, bias=False)

    # -- what a family supplies ----------------------------------------------------------
    @property
    def text(self) -> nn.Module:
        """The block stack: embed_tokens, layers, norm; text(h, positions, masks, cache) → h."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, require_media: bool = True, **media) -> torch.Tensor:
        """Token ids [B, S] (plus media) → input embeddings [B, S, hidden]."""
        raise NotImplementedError

    def masks(self, q_idx: torch.Tensor, k_idx: dict, k_valid: dict, mm_token_type_ids, block_mask: str) -> dict:
        """Layer type → bool mask [B|1, 1, Q, K]: causal, the sliding window on sliding layers,
        padding keys hidden, and, when the config asks (use_bidirectional_attention "vision"),
        bidirectional within each image / video block of this step."""
        t = self.config.text
        q_block = None
        if mm_token_type_ids is not None and t.use_bidirectional_attention == "vision":
            q_block = block_ids(mm_token_type_ids.to(q_idx.device))
        masks = {}
        for lt in set(t.layer_types):
            ki = k_idx[lt]
            k_block = None
            if q_block is not None:  # only keys of this step can share a block with its queries
                rel = ki - q_idx[0]
                inside = (rel >= 0) & (rel < q_idx.shape[0])
                k_block = torch.where(inside, q_block[:, rel.clamp(0, q_idx.shape[0] - 1)], -1)
            window = t.sliding_window if lt == SLIDING else None
            masks[lt] = make_mask(q_idx, ki, k_valid[lt], q_block, k_block, window, block_mask)
        return masks

    # -- written once ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.text.norm.weight.dtype  # a float weight even when the matrices are quantized

    @property
    def device(self) -> torch.device:
        return self.text.norm.weight.device

    def make_cache(self, batch: int, max_len: int, reserve: int = 16, kv_dtype: str = "auto",
                   quant_layers: str | None = None) -> KVCache:
        """kv_dtype / quant_layers: how K/V are stored (cache/kv.py `layer_dtypes`)."""
        return KVCache(self.config.text, batch, max_len, self.dtype, self.device, reserve, kv_dtype, quant_layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *, attention_mask=None,
                mm_token_type_ids=None, cache: KVCache | None = None, block_mask: str | None = None,
                require_media: bool = True, embeds: torch.Tensor | None = None, **media) -> torch.Tensor:
        """One forward over new tokens. Returns the final normed hidden states [B, S, hidden].

        positions [B, S]: RoPE positions. attention_mask [B, S] (new tokens only when a cache is
        given): 0 marks left padding. With a cache the new tokens are appended to it.
        embeds: precomputed input embeddings of these tokens (`embed`), e.g. a slice of a
        prompt embedded once and prefilled in chunks; media are then not needed.
        """
        block_mask = block_mask or self.block_mask
        h = embeds if embeds is not None else self.embed(input_ids, require_media=require_media, **media)
        B, S = input_ids.shape
        valid = (torch.ones(B, S, dtype=torch.bool, device=h.device) if attention_mask is None
                 else attention_mask.to(h.device).bool())
        if cache is None:
            idx = torch.arange(S, device=h.device)
            kv_valid = None if attention_mask is None else valid
            masks = self.masks(idx, {SLIDING: idx, FULL: idx}, {SLIDING: kv_valid, FULL: kv_valid},
                               mm_token_type_ids, block_mask)
            return self.text(h, positions.to(h.device), masks)
        steps = cache.begin(valid)
        idx = cache.query_index(S)  # [S], or [B, S] when each row is its own sequence
        if idx.dim() == 2 and mm_token_type_ids is not None:
            raise ValueError("media tokens are prefilled one sequence at a time, not in a decode batch")
        masks = self.masks(idx, {t: s.k_idx for t, s in steps.items()}, {t: s.k_valid for t, s in steps.items()},
                           mm_token_type_ids, block_mask)
        try:
            out = self.text(h, positions.to(h.device), masks, cache)
        except BaseException:
            cache.abort()
            raise
        cache.end()
        return out

    def head_weight(self) -> torch.Tensor | None:
        """The LM head's float weight (None when it is quantized, or when an untied head was
        swapped for its packed form, which keeps no plain weight)."""
        w = getattr(self.text.embed_tokens if self.config.text.tie_word_embeddings else self.lm_head, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None

    @property
    def output(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The head module, hidden → raw logits: `lm_head` when the model has one (an untied
        Linear, or a packed head swapped in), else the tied embedding's `linear`. Looked up at
        each call, not stored: quantization and loading replace the embedding module."""
        lm_head = getattr(self, "lm_head", None)
        return lm_head if lm_head is not None else self.text.embed_tokens.linear

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden [.., hidden] → softcapped logits [.., vocab] in the model dtype."""
        return softcap(self.output(h), self.config.text.final_logit_softcapping)

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, mm_token_type_ids=None, *, block_mask: str | None = None,
               **media) -> torch.Tensor:
        """The reference forward: processor tensors → logits [B, S, vocab] (model dtype).

        Positions are 0..S-1 as in transformers' plain forward (RoPE is relative, so left
        padding does not change the logits of real tokens beyond rounding).
        """
        input_ids = check_ids(input_ids, self.config.text.vocab_size)
        B, S = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, S)}")
        if mm_token_type_ids is not None and tuple(mm_token_type_ids.shape) != (B, S):
            raise InputError(f"mm_token_type_ids {tuple(mm_token_type_ids.shape)} does not match input_ids {(B, S)}")
        positions = torch.arange(S, device=self.device).expand(B, S)
        h = self.forward(input_ids.to(self.device), positions, attention_mask=attention_mask,
                         mm_token_type_ids=mm_token_type_ids, block_mask=block_mask, **media)
        return self.head(h)
