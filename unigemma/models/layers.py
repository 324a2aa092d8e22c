"""Shared primitives of the Gemma text stacks: RMSNorm, the gated GELU MLP, tied embedding, logit softcap.

`rms_norm`'s numerics (unigemma/norm.py) follow the reference exactly (spec §3.2); Gemma 3's
(1 + w) norm is models/gemma3.py's.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..norm import rms_norm


__all__ = ["MLP", "Embedding", "RMSNorm", "rms_norm", "softcap"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)); gate and up are separate checkpoint tensors."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Embedding(nn.Embedding):
    """nn.Embedding that can also act as the tied LM head; quant.linear.QuantEmbedding is its
    quantized twin (lookup via forward, head via `linear`), so the model never asks which."""

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), in x's dtype (the reference does not upcast the logits)."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap
