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

With `use_ordered_embeddings` (the centroid head of the small released drafters) the vocabulary
is cut into `num_centroids` clusters of equal size (`token_ordering` lists the token ids
cluster by cluster); `centroids(y)` picks the top `centroid_intermediate_top_k` clusters and
only their tokens get a dot product with the head; every other token gets the smallest logit
computed minus one, as the reference does. A draft step then reads k/num_centroids of the head.

Every step of a round runs at one position: that of the token it reads. The drafter keeps no
KV cache and never prefills. Pure math: generate/speculative.py hands in the target's K/V and
which of them each query may see. Not a `CausalLM` family (it has no cached forward of its
own): its blocks are Gemma 4's, its attention is models/attention.py `attend`, its text config
is parsed by config.py's `from_keys`; weights/drafter.py loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, SLIDING, TextConfig, check, from_keys
from ..errors import ConfigError
from .attention import attend
from .layers import Embedding, RMSNorm
from .rope import Rope, apply_rope
from .text import DecoderLayer


@dataclass
class DrafterConfig:
    text: TextConfig  # its own width, query heads and MLP; head dims / KV heads are the target's
    backbone_hidden_size: int  # the target's hidden size
    tie_word_embeddings: bool = True
    use_ordered_embeddings: bool = False  # the centroid head
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DrafterConfig":
        w = "drafter config"
        check(isinstance(d, dict), w, f"expected an object, got {type(d).__name__}")
        check(d.get("model_type") == "gemma4_unified_assistant", w,
               f"model_type {d.get('model_type')!r} is not a Gemma 4 unified drafter ('gemma4_unified_assistant')")
        tc = d.get("text_config")
        check(isinstance(tc, dict), w, "needs a text_config object")
        # Every drafter layer reads the target's K/V ("KV-shared"); it has no K/V projections
        # of its own, which is all that setting means for us.
        text = from_keys(TextConfig, {**tc, "num_kv_shared_layers": 0}, "drafter text_config")
        b = d.get("backbone_hidden_size", 3840)
        check(isinstance(b, int) and b > 0, w, f"backbone_hidden_size must be a positive integer, got {b!r}")
        ordered = bool(d.get("use_ordered_embeddings", False))
        n, top = d.get("num_centroids", 2048), d.get("centroid_intermediate_top_k", 32)
        if ordered:
            check(isinstance(n, int) and n > 0 and text.vocab_size % n == 0, w,
                   f"num_centroids must be a positive divisor of the vocabulary size {text.vocab_size}, got {n!r}")
            check(isinstance(top, int) and 0 < top <= n, w,
                   f"centroid_intermediate_top_k must be an integer in 1..num_centroids, got {top!r}")
        return cls(text, b, bool(d.get("tie_word_embeddings", True)), ordered, n, top)

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
        out = attend(q, k.to(q.dtype), v.to(q.dtype), mask, scale=1.0)  # drafting: one query; training: all
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class DraftLayer(DecoderLayer):
    """A target block (norms, MLP, layer scalar) whose attention reads the target's K/V."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__(config, layer_idx, attention=DraftAttention)

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


class MaskedEmbedder(nn.Module):
    """The centroid head: logits for the tokens of the top-k clusters only."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.top_k = config.centroid_intermediate_top_k
        self.num_centroids = config.num_centroids
        self.centroids = nn.Linear(config.text.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.arange(config.text.vocab_size))

    def _pick(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top clusters [.., top_k] and their token ids [.., top_k * size]."""
        clusters = self.centroids(y).topk(self.top_k, dim=-1).indices
        return clusters, self.token_ordering.long().view(self.num_centroids, -1)[clusters].flatten(-2)

    def forward(self, y: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        clusters, ids = self._pick(y)
        rows = self._by_cluster(head)[clusters].flatten(-3, -2) if not torch.is_grad_enabled() else head[ids]
        picked = (y.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)
        # one fill value for the whole call, the smallest logit computed minus one (as the reference)
        out = picked.new_full((*y.shape[:-1], head.shape[0]), float(picked.min()) - 1.0)
        return out.scatter_(-1, ids, picked)

    def top_token(self, y: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        clusters, ids = self._pick(y)
        w = self._by_cluster(head)
        best = []
        for row, c in zip(y.reshape(-1, y.shape[-1]), clusters.reshape(-1, self.top_k)):  # one draft row, mostly
            best.append(F.linear(row, w.index_select(0, c).view(-1, w.shape[-1])).argmax())
        return ids.reshape(-1, ids.shape[-1]).gather(-1, torch.stack(best)[:, None]).view(ids.shape[:-1])

    def _by_cluster(self, head: torch.Tensor) -> torch.Tensor:
        """The head's rows in cluster order [num_centroids, size, hidden], made once: a draft
        step then copies 32 contiguous blocks instead of gathering 4,096 scattered rows."""
        key = (head.data_ptr(), head._version, self.token_ordering._version)
        if getattr(self, "_sorted_key", None) != key:
            self._sorted = head[self.token_ordering.long()].view(self.num_centroids, -1, head.shape[-1])
            self._sorted_key = key
        return self._sorted


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
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(config)
        self.ropes = {lt: Rope(t, lt) for lt in set(t.layer_types)}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype  # (the linears may be packed: no .weight)

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                kv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step for S queries per row (S = 1 when drafting).

        token_embeds, hidden: [B, S, backbone hidden]; positions [B, S] (RoPE of the queries);
        kv[type] = (k, v [B, kv_heads, K, head_dim], mask [B, 1, S, K] bool: which keys each
        query sees). Returns logits [B, S, vocab] and the next hidden [B, S, backbone hidden].
        """
        y = self.body(token_embeds, hidden, positions, kv)
        return self.logits(y), self.post_projection(y)

    def body(self, token_embeds, hidden, positions, kv) -> torch.Tensor:
        """The normed output y of the four blocks (what the head and post_projection read)."""
        x = self.pre_projection(torch.cat([token_embeds, hidden], dim=-1).to(self.dtype))
        tables = {lt: rope.cos_sin(positions, x.dtype) for lt, rope in self.ropes.items()}
        for layer in self.model.layers:
            k, v, mask = kv[layer.layer_type]
            x = layer(x, *tables[layer.layer_type], k, v, mask)
        return self.model.norm(x)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def top_token(self, y: torch.Tensor) -> torch.Tensor:
        """argmax of logits(y) [..] without the vocabulary-wide row: the centroid head scores
        only its picked tokens (ties may break another way: a draft is only a guess)."""
        if not self.config.use_ordered_embeddings:
            return F.linear(y, self.head_weight).argmax(-1)
        return self.masked_embedding.top_token(y, self.head_weight)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(y, self.head_weight)
        return F.linear(y, self.head_weight)


__all__ = ["Drafter", "DrafterConfig", "FULL", "SLIDING"]
