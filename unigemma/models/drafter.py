"""The MTP drafter (`Gemma4UnifiedAssistantForCausalLM`): four small blocks that guess the
target's next tokens from the target's own state (spec §9, field-notes A2).

    x = pre_projection(cat(target_embed(token), h))   token embedding ×√hidden of the *target*;
                                                      h: the target's last hidden state (final
                                                      norm applied), later the drafter's own
    4 blocks, each: q-only attention over the target's KV cache (sliding blocks read the
                    target's last sliding layer, the full block its last full layer), then the
                    MLP, the four norms and the layer scalar of a target block
    y = norm(x)
    logits = lm_head(y)        tied to the drafter's own embed_tokens; no softcap (the reference
                               applies none)
    h_next = post_projection(y)  the `h` of the next draft step

Every step of a round runs at one position: that of the token it reads. The drafter keeps no
KV cache and never prefills. Pure math: generate/speculative.py hands in the target's K/V and
which of them each query may see.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, SLIDING, TextConfig, _check
from ..errors import ConfigError
from .layers import MLP, Embedding, RMSNorm
from .rope import Rope, apply_rope


@dataclass
class DrafterConfig:
    text: TextConfig  # its own width, query heads and MLP; head dims / KV heads are the target's
    backbone_hidden_size: int  # the target's hidden size
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrafterConfig":
        w = "drafter config"
        _check(isinstance(d, dict), w, f"expected an object, got {type(d).__name__}")
        _check(d.get("model_type") == "gemma4_unified_assistant", w,
               f"model_type {d.get('model_type')!r} is not a Gemma 4 unified drafter ('gemma4_unified_assistant')")
        _check(not d.get("use_ordered_embeddings", False), w,
               "use_ordered_embeddings=true (the centroid head of the small drafters) is not supported")
        tc = d.get("text_config")
        _check(isinstance(tc, dict), w, "needs a text_config object")
        tc = copy.deepcopy(tc)
        # Every drafter layer reads the target's K/V ("KV-shared"); it has no K/V projections
        # of its own, which is all that setting means for us.
        tc["num_kv_shared_layers"] = 0
        text = TextConfig(**{k: v for k, v in tc.items() if k in TextConfig.__dataclass_fields__
                             and TextConfig.__dataclass_fields__[k].init})
        b = d.get("backbone_hidden_size", 3840)
        _check(isinstance(b, int) and b > 0, w, f"backbone_hidden_size must be a positive integer, got {b!r}")
        return cls(text, b, bool(d.get("tie_word_embeddings", True)))

    def check_target(self, target: TextConfig) -> None:
        """The drafter's queries must fit the target's keys: same head dim and KV heads per type."""
        if self.backbone_hidden_size != target.hidden_size:
            raise ConfigError(f"drafter expects a target of hidden size {self.backbone_hidden_size}, "
                              f"the model has {target.hidden_size}")
        for t in set(self.text.layer_types):
            if t not in target.layer_types:
                raise ConfigError(f"drafter has {t} layers; the target has none to read K/V from")
            ours = (self.text.head_dim_of(t), self.text.kv_heads_of(t))
            theirs = (target.head_dim_of(t), target.kv_heads_of(t))
            if ours != theirs:
                raise ConfigError(f"drafter {t} layers expect (head_dim, kv_heads) = {ours}; the target has {theirs}")


class DraftAttention(nn.Module):
    """Queries only; keys and values are the target's (already normed and rotated)."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.layer_head_dims[layer_idx]
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, k, v, mask):
        B, S, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, -1, self.head_dim)), cos, sin).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=1.0,
                                             enable_gqa=k.shape[1] != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class DraftLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = DraftAttention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h, cos, sin, k, v, mask):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, k, v, mask))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class _Body(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)  # only the tied head's weight
        self.layers = nn.ModuleList(DraftLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.model = _Body(t)
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.ropes = {lt: Rope(t, lt) for lt in set(t.layer_types)}

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_projection.weight.dtype

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                kv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step for S queries per row (S = 1 when drafting).

        token_embeds, hidden: [B, S, backbone hidden]; positions [B, S] (RoPE of the queries);
        kv[type] = (k, v [B, kv_heads, K, head_dim], mask [B, 1, S, K] bool: which keys each
        query sees). Returns logits [B, S, vocab] and the next hidden [B, S, backbone hidden].
        """
        x = self.pre_projection(torch.cat([token_embeds, hidden], dim=-1).to(self.dtype))
        tables = {lt: rope.cos_sin(positions, x.dtype) for lt, rope in self.ropes.items()}
        for layer in self.model.layers:
            k, v, mask = kv[layer.layer_type]
            x = layer(x, *tables[layer.layer_type], k, v, mask)
        y = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(y, head), self.post_projection(y)


__all__ = ["Drafter", "DrafterConfig", "FULL", "SLIDING"]
