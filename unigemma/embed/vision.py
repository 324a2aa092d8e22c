"""Encoder-free image embedder (spec §5.3): each 48×48 pixel patch becomes one token.

    patch [6912] → LayerNorm → Dense(+bias) → LayerNorm → + x/y position rows → LayerNorm
                 → scale-free RMSNorm → Linear → text width

No attention here: a soft token depends only on its own pixels and (x, y) position; all
cross-patch mixing happens in the decoder through the bidirectional block mask. Video frames
go through the same embedder. LayerNorms use PyTorch's default eps 1e-5, as the reference
does (keras-hub uses 1e-6; spec §10).
"""

import torch
from torch import nn

from ..config import VisionConfig
from .multimodal import MultimodalEmbedder


class VisionEmbedder(nn.Module):
    def __init__(self, config: VisionConfig, text_hidden: int):
        super().__init__()
        d = config.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(config.patch_dim)
        self.patch_dense = nn.Linear(config.patch_dim, d)
        self.patch_ln2 = nn.LayerNorm(d)
        self.pos_embedding = nn.Parameter(torch.zeros(config.mm_posemb_size, 2, d))  # [:, 0] x table, [:, 1] y table
        self.pos_norm = nn.LayerNorm(d)
        self.multimodal_embedder = MultimodalEmbedder(d, text_hidden, config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [..., P, 6912] in [0, 1]; position_ids [..., P, 2] as (x, y), (-1, -1) = padding.

        Returns [..., P, text_hidden] for every patch, padding included (callers drop it).
        """
        h = pixel_values.to(self.patch_dense.weight.dtype)  # bf16 weights see bf16 pixels
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(h)))
        valid = (position_ids != -1).to(self.pos_embedding.dtype).unsqueeze(-1)  # [..., P, 2, 1]
        axes = torch.arange(2, device=position_ids.device)
        pos = (self.pos_embedding[position_ids.clamp(min=0).long(), axes] * valid).sum(-2)  # x row + y row
        return self.multimodal_embedder(self.pos_norm(h + pos))


def embed_patches(embedder: VisionEmbedder, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Images [N, P, 6912] or video frames [V, F, P, 6912] / [F, P, 6912] → [num_real_patches, hidden].

    Padding patches (position (-1, -1)) are dropped; the rest stay in order (image by image,
    frame by frame, raster order within each), which is the order of the placeholders.
    """
    if pixel_values.shape[:-1] != position_ids.shape[:-1]:
        raise ValueError(f"pixel values {tuple(pixel_values.shape)} and position ids "
                         f"{tuple(position_ids.shape)} disagree on the number of patches")
    pixel_values = pixel_values.reshape(-1, *pixel_values.shape[-2:])
    position_ids = position_ids.reshape(-1, *position_ids.shape[-2:])
    real = (position_ids != -1).all(-1)  # [N, P]
    return embedder(pixel_values, position_ids)[real]
