"""The Gemma 4 unified text decoder: embeddings → 48 blocks → norm → tied head → softcap.

Pure math over (embeddings, positions, masks, cache). Block (spec §3.3):

    h = h + post_attention_norm(attn(input_norm(h)))
    h = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    h = h * layer_scalar            # a learned scalar on the whole residual stream
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .attention import Attention
from .layers import MLP, Embedding, RMSNorm, softcap
from .rope import Rope


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int, attention: type[nn.Module] = Attention):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = attention(config, layer_idx)  # the MTP drafter's: queries only
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, cache))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h * self.layer_scalar


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ropes = {t: Rope(config, t) for t in set(config.layer_types)}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings × sqrt(hidden); the scale is cast to the weight dtype first (62.0 in bf16)."""
        e = self.embed_tokens(ids)  # [.., hidden] in the model dtype (quantized tables dequantize rows)
        return e * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(e.dtype)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, masks: dict, cache=None) -> torch.Tensor:
        """h [B, S, hidden] input embeddings; positions [B, S] RoPE positions; masks per layer type."""
        tables = {t: rope.cos_sin(positions, h.dtype) for t, rope in self.ropes.items()}
        for layer in self.layers:
            cos, sin = tables[layer.layer_type]
            h = layer(h, cos, sin, masks[layer.layer_type], cache)
        return self.norm(h)

    def head(self, h: torch.Tensor, lm_head: torch.Tensor | nn.Module | None = None) -> torch.Tensor:
        """Final hidden [.., hidden] → softcapped logits [.., vocab] in the model dtype.
        lm_head: an untied head (weight or module); None or the embedding's own weight uses the
        tied table through `linear`, which also serves a quantized (int8) table."""
        if lm_head is None or lm_head is self.embed_tokens.weight:
            logits = self.embed_tokens.linear(h)
        elif isinstance(lm_head, torch.Tensor):
            logits = F.linear(h, lm_head)
        else:
            logits = lm_head(h)
        return softcap(logits, self.config.final_logit_softcapping)
