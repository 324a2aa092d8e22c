"""The Gemma text decoder stack: embeddings → blocks → final norm (the head is models/base.py's).

Pure math over (embeddings, positions, masks, cache). Gemma 4's block (spec §3.3):

    h = h + post_attention_norm(attn(input_norm(h)))
    h = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    h = h * layer_scalar            # a learned scalar on the whole residual stream

`TextModel` takes the block and norm classes, so a family whose block differs (Gemma 3: no
layer scalar, (1 + w) norms) reuses the stack and names only what differs. This file knows
nothing of media, caches' layout or checkpoints.
"""

import math

import torch
from torch import nn

from ..config import DecoderConfig, TextConfig
from .attention import Attention
from .layers import MLP, Embedding, RMSNorm
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
    def __init__(self, config: DecoderConfig, layer: type[nn.Module] = DecoderLayer,
                 norm: type[nn.Module] = RMSNorm):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm(config.hidden_size, config.rms_norm_eps)
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
