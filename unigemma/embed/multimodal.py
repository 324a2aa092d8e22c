"""The last two steps every media embedder shares: a scale-free RMSNorm, then one Linear into
the text width (spec §2.3). embed/audio.py is only this; embed/vision.py ends with it.

Knows nothing of the decoder or of which media it serves.
"""

import torch
from torch import nn

from ..norm import rms_norm


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
