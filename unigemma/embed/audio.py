"""Encoder-free audio (spec §6.3): a 640-sample frame (40 ms at 16 kHz) becomes one token.

The frame goes through the shared `MultimodalEmbedder` (embed/multimodal.py): a scale-free
RMSNorm, which removes per-frame loudness, and one Linear into the text width. This file only
selects the real frames; it knows nothing of the decoder.
"""

import torch

from .multimodal import MultimodalEmbedder


def embed_audio(embedder: MultimodalEmbedder, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """features [N, T, 640], mask [N, T] (True = real frame) → [num_real_frames, hidden], in order."""
    return embedder(features)[mask.to(torch.bool)]
