"""Gemma 3 text (`Gemma3ForCausalLM`, GGUF arch `gemma3`): the decoder and its generation protocol.

Block, as transformers' Gemma 3 (the reference):

    h = h + post_attention_norm(attn(input_norm(h)))
    h = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    attn: q = rope(q_norm(q_proj x)), k = rope(k_norm(k_proj x)), v = v_proj x   (no v norm)
          softmax(q kᵀ · query_pre_attn_scalar^-0.5 + mask) v

Gemma 3's RMSNorm multiplies by (1 + w). Checkpoints store w; llama.cpp's converter stores
1 + w (`norm_shift` in its gemma3 converter). We hold the multiplier 1 + w in float32, as
the reference computes it (`1.0 + weight.float()`): `transform` adds the 1 for safetensors
checkpoints, GGUF tensors are taken as they are. No layer scalar, no K=V, one head dim on
every layer, sliding window on 5 of 6 layers. The model object offers what the engine uses
from `Gemma4Unified` (embed, forward over a cache, head, logits, make_cache) without media.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.kv import KVCache
from ..config import FULL, SLIDING, ModelConfig
from ..errors import InputError
from .layers import MLP, Embedding, softcap
from .masks import make_mask
from .rope import Rope, apply_rope


class Norm(nn.Module):
    """RMSNorm whose `weight` is the whole multiplier (1 + w of the checkpoint), kept in float32."""

    keeps_float32 = True  # the loader does not cast this weight to the model dtype

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # rsqrt, as the reference
        return (y * self.weight.float()).type_as(x)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.scaling = config.query_pre_attn_scalar ** -0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Norm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Norm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        B, S, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, -1, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, S, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(B, S, -1, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = _sdpa(q, k, v, mask, self.scaling, self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


MIN_QUERIES = 4


def _sdpa(q, k, v, mask, scale, gqa):
    """SDPA, with bf16 calls of fewer than MIN_QUERIES queries padded up to it: PyTorch's CPU
    kernel sums in another order below 4 queries, so a one-token step would differ (by bf16
    rounding) from the same token verified among 4+ drafts. Padded, greedy decoding with a
    drafter reproduces plain decoding bit for bit (see also packed.py, cache/kv.py KEY_BLOCK)."""
    S = q.shape[2]
    if q.dtype != torch.bfloat16 or S >= MIN_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    pad = MIN_QUERIES - S
    q = torch.cat([q, q[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    if mask is not None and mask.shape[2] == S:
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)[:, :, :S]


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Norm(config.hidden_size, eps)
        self.post_attention_layernorm = Norm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = Norm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Norm(config.hidden_size, eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TextModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Norm(config.hidden_size, config.rms_norm_eps)
        self.ropes = {t: Rope(config, t) for t in set(config.layer_types)}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed_tokens(ids)
        return e * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(e.dtype)

    def forward(self, h, positions, masks, cache=None):
        tables = {t: rope.cos_sin(positions, h.dtype) for t, rope in self.ropes.items()}
        for layer in self.layers:
            cos, sin = tables[layer.layer_type]
            h = layer(h, cos, sin, masks[layer.layer_type], cache)
        return self.norm(h)


def checkpoint_name_to_module(name: str, config: ModelConfig) -> str | None:
    """Our module tree mirrors Gemma3ForCausalLM's names; a tied head's copy is not stored."""
    return None if name == "lm_head.weight" and config.text.tie_word_embeddings else name


def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Fold Gemma 3's (1 + w) into the norm weights once, in float32 as the reference computes it."""
    return tensor.float() + 1.0 if name.endswith("norm.weight") else tensor


class Gemma3ForCausalLM(nn.Module):
    block_mask = "sliding"  # no media blocks: one mask policy

    def __init__(self, config: ModelConfig, block_mask: str = "sliding"):
        super().__init__()
        self.config = config
        self.model = TextModel(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.packed_head = None  # models/packed.py: the head weight prepacked for fast decoding

    @property
    def text(self) -> TextModel:
        return self.model

    @property
    def dtype(self) -> torch.dtype:
        # the norms are float32 whatever the model dtype; a quantized table records the dtype it yields
        e = self.model.embed_tokens
        return getattr(e, "dtype", None) or e.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def make_cache(self, batch: int, max_len: int, reserve: int = 16) -> KVCache:
        return KVCache(self.config.text, batch, max_len, self.dtype, self.device, reserve)

    def embed(self, input_ids: torch.Tensor, require_media: bool = True, **media) -> torch.Tensor:
        given = [k for k, v in media.items() if v is not None]
        if given:
            raise InputError(f"Gemma 3 text takes no media inputs, got {given}")
        return self.model.embed(input_ids)

    def _masks(self, q_idx, k_idx: dict, k_valid: dict) -> dict:
        t = self.config.text
        return {lt: make_mask(q_idx, k_idx[lt], k_valid[lt], None, None, t.sliding_window if lt == SLIDING else None)
                for lt in set(t.layer_types)}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *, attention_mask=None,
                mm_token_type_ids=None, cache: KVCache | None = None, block_mask: str | None = None,
                require_media: bool = True, embeds: torch.Tensor | None = None, **media) -> torch.Tensor:
        """Same contract as Gemma4Unified.forward: new tokens (appended to `cache` if given) →
        final normed hidden states [B, S, hidden]."""
        h = embeds if embeds is not None else self.embed(input_ids, **media)
        B, S = input_ids.shape
        valid = (torch.ones(B, S, dtype=torch.bool, device=h.device) if attention_mask is None
                 else attention_mask.to(h.device).bool())
        if cache is None:
            idx = torch.arange(S, device=h.device)
            kv_valid = None if attention_mask is None else valid
            return self.model(h, positions.to(h.device), self._masks(idx, {SLIDING: idx, FULL: idx},
                                                                    {SLIDING: kv_valid, FULL: kv_valid}))
        steps = cache.begin(valid)
        idx = cache.query_index(S)  # [S], or [B, S] when each row is its own sequence (a decode batch)
        masks = self._masks(idx, {t: s.k_idx for t, s in steps.items()}, {t: s.k_valid for t, s in steps.items()})
        try:
            out = self.model(h, positions.to(h.device), masks, cache)
        except BaseException:
            cache.abort()
            raise
        cache.end()
        return out

    def head_weight(self) -> torch.Tensor | None:
        """The LM head's float weight (None when it is quantized)."""
        w = getattr(self.model.embed_tokens if self.config.text.tie_word_embeddings else self.lm_head, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.packed_head is not None:
            logits = self.packed_head(h)
        elif self.config.text.tie_word_embeddings:
            logits = self.model.embed_tokens.linear(h)
        else:
            logits = self.lm_head(h)
        return softcap(logits, self.config.text.final_logit_softcapping)

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, **media) -> torch.Tensor:
        """The reference forward: ids [B, S] → logits [B, S, vocab], positions 0..S-1."""
        from .gemma4 import _check_ids

        input_ids = _check_ids(input_ids, self.config.text.vocab_size).to(self.device)
        B, S = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, S)}")
        positions = torch.arange(S, device=self.device).expand(B, S)
        return self.head(self.forward(input_ids, positions, attention_mask=attention_mask, **media))
