"""The RMSNorm numerics every Gemma 4 part shares: the decoder's norms (models/layers.py) and
the media embedders' scale-free norm (embed/multimodal.py).

Kept below both packages so the embedders need not import the model package. Numerics follow
the reference exactly (spec §3.2): statistics in float32, the weight multiplies directly (no
`1 + w` as in Gemma 2/3), the reciprocal root is a power.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, cast back to x's dtype after the weight."""
    x32 = x.float()
    # a power, not rsqrt: the reference does this to match JAX bit for bit
    y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)
