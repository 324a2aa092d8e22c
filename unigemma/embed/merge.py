"""The multimodal seam: soft-token features are written into their placeholder positions.

Features arrive already in text width and are *not* multiplied by the embedding scale
(only text embeddings are). The number of placeholder slots must equal the number of
feature rows, or the request is malformed.
"""

import torch

from ..errors import InputError


def scatter_features(embeds: torch.Tensor, slots: torch.Tensor, features: torch.Tensor, what: str) -> torch.Tensor:
    """embeds [B, S, H]; slots [B, S] bool placeholders; features [N, H] in order of appearance."""
    n_slots = int(slots.sum())
    if n_slots != features.shape[0]:
        raise InputError(f"{what}: the prompt has {n_slots} {what} placeholder tokens but the inputs "
                         f"give {features.shape[0]} {what} soft tokens")
    return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))
