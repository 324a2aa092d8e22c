"""Encoder-free audio and final multimodal projection (spec §6.3, §2.3).

A 640-sample frame (40 ms at 16 kHz) becomes a token through a scale-free RMSNorm, which
removes per-frame loudness, and one Linear into the text width. The vision embedder ends
in the same two steps, so both use `MultimodalEmbedder`.
"""

import torch
from torch import nn

from ..models.layers import rms_norm


class MultimodalEmbedder(nn.Module):
    """Scale-free RMSNorm → Linear (no bias). Inputs are cast to the weight dtype first,
    so bf16 weights see bf16-rounded raw samples, as in the reference."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(rms_norm(x, None, self.eps))


def embed_audio(embedder: MultimodalEmbedder, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """features [N, T, 640], mask [N, T] (True = real frame) → [num_real_frames, hidden], in order."""
    return embedder(features)[mask.to(torch.bool)]
