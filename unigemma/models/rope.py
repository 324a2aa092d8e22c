"""Rotary position embeddings, one table per layer type (spec §3.5).

Gemma 3 uses the default RoPE (or "linear" scaling) on both layer types. Gemma 4's sliding
layers use the default RoPE over the whole head dim. Full layers use Gemma 4's
"proportional" RoPE: only the first `partial_rotary_factor * head_dim / 2` frequency pairs
rotate, with the exponent's denominator the *full* head dim; the remaining pairs get
frequency 0 (cos 1, sin 0), so those dims pass through unchanged.
"""

import torch

from ..config import TextConfig


def inv_freq(config: TextConfig, layer_type: str, device=None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies for one layer type."""
    p = config.rope_parameters[layer_type]
    head_dim = config.head_dim_of(layer_type)
    base = float(p["rope_theta"])
    kind = p.get("rope_type", "default")
    if kind in ("default", "linear"):  # linear (Gemma 3 4B+ full layers): positions / factor
        f = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
        return f / float(p["factor"]) if kind == "linear" else f
    rope_angles = int(p.get("partial_rotary_factor", 1.0) * head_dim // 2)
    rotated = 1.0 / (base ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.float, device=device) / head_dim))
    return torch.cat([rotated, torch.zeros(head_dim // 2 - rope_angles, dtype=torch.float, device=device)])


class Rope:
    """cos/sin tables for a layer type, computed per forward from integer positions.

    Not an nn.Module: it holds no weights, and the model is built on the meta device.
    """

    def __init__(self, config: TextConfig, layer_type: str):
        self.config, self.layer_type = config, layer_type
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] int → cos, sin [B, S, head_dim] in `dtype` (computed in float32)."""
        f = self._inv_freq.get(positions.device)
        if f is None:
            f = self._inv_freq[positions.device] = inv_freq(self.config, self.layer_type, positions.device)
        freqs = positions[..., None].float() * f  # [B, S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, D]. Rotate-half (NeoX) layout: dim j pairs with j + D/2."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
