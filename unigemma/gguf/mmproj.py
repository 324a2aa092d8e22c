"""The mmproj GGUF of Gemma 4 unified: projector types gemma4uv (image) and gemma4ua (audio).

llama.cpp's converter (`Gemma4UnifiedVisionAudioModel`) stores our embedders' weights under
clip names, reordered for ggml's im2col, which yields a patch channel-first (all R, then all
G, then all B) where the checkpoint's Dense expects pixel-interleaved RGBRGB…:
  v.patch_norm.1 / v.patch_embd  patch_ln1 / patch_dense, columns permuted CHW ← HWC (undone here)
  v.patch_norm.2 / .3            patch_ln2 / pos_norm
  v.position_embd                pos_embedding, stored [2, positions, d] (ours [positions, 2, d])
  mm.input_projection            the vision embedder's final projection
  mm.a.input_projection          the audio embedder's projection
The media marker token ids are looked up by name in the text GGUF's vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError

MMPROJ_TYPES = ("gemma4uv", "gemma4ua")
V = "model.embed_vision."
_NAMES = {
    "v.patch_norm.1.weight": V + "patch_ln1.weight", "v.patch_norm.1.bias": V + "patch_ln1.bias",
    "v.patch_embd.weight": V + "patch_dense.weight", "v.patch_embd.bias": V + "patch_dense.bias",
    "v.patch_norm.2.weight": V + "patch_ln2.weight", "v.patch_norm.2.bias": V + "patch_ln2.bias",
    "v.patch_norm.3.weight": V + "pos_norm.weight", "v.patch_norm.3.bias": V + "pos_norm.bias",
    "v.position_embd.weight": V + "pos_embedding",
    "mm.input_projection.weight": V + "multimodal_embedder.embedding_projection.weight",
    "mm.a.input_projection.weight": "model.embed_audio.embedding_projection.weight",
}
_MARKERS = {"image_token_id": "<|image|>", "video_token_id": "<|video|>", "audio_token_id": "<|audio|>",
            "boi_token_id": "<|image>", "eoi_token_id": "<image|>", "boa_token_id": "<|audio>",
            "eoa_token_index": "<audio|>"}


def _hwc_from_chw(p: int) -> torch.Tensor:
    """perm with gguf[..., i] = ours[..., perm[i]] (the converter's own formula)."""
    i = torch.arange(p * p * 3)
    ch, row, col = i // (p * p), (i % (p * p)) // p, i % p
    return row * p * 3 + col * 3 + ch


def _unpermute(t: torch.Tensor) -> torch.Tensor:
    p = math.isqrt(t.shape[-1] // 3)
    out = torch.empty_like(t)
    out[..., _hwc_from_chw(p)] = t
    return out


def mmproj_config(mm, text_meta: dict, text_hidden: int) -> dict:
    """vision_config / audio_config / media token ids for ModelConfig, from the mmproj metadata."""
    m, path = mm.metadata, mm.path
    if mm.arch != "clip":
        raise CheckpointError(f"{path}: not an mmproj file (architecture {mm.arch!r}, expected 'clip')")
    out: dict = {}
    if m.get("clip.has_vision_encoder"):
        if m.get("clip.vision.projector_type") != "gemma4uv":
            raise CheckpointError(f"{path}: vision projector {m.get('clip.vision.projector_type')!r} is not "
                                  "supported (expected gemma4uv)")
        dense, pos = mm.tensors.get("v.patch_embd.weight"), mm.tensors.get("v.position_embd.weight")
        if dense is None or pos is None:
            raise CheckpointError(f"{path}: gemma4uv projector without v.patch_embd / v.position_embd tensors")
        patch, model_patch = int(m["clip.vision.patch_size"]), math.isqrt(dense.shape[1] // 3)
        d = int(m["clip.vision.embedding_length"])
        out["vision_config"] = dict(patch_size=patch, pooling_kernel_size=model_patch // patch, mm_embed_dim=d,
                                    output_proj_dims=d, mm_posemb_size=pos.shape[1],
                                    rms_norm_eps=float(m.get("clip.vision.attention.layer_norm_epsilon", 1e-6)))
    if m.get("clip.has_audio_encoder"):
        if m.get("clip.audio.projector_type") != "gemma4ua":
            raise CheckpointError(f"{path}: audio projector {m.get('clip.audio.projector_type')!r} is not "
                                  "supported (expected gemma4ua)")
        out["audio_config"] = dict(audio_embed_dim=int(m["clip.audio.embedding_length"]),
                                   rms_norm_eps=float(m.get("clip.audio.attention.layer_norm_epsilon", 1e-6)))
    if not out:
        raise CheckpointError(f"{path}: the mmproj has neither a vision nor an audio projector")
    for key, dim in (("clip.vision.projection_dim", text_hidden), ("clip.audio.projection_dim", text_hidden)):
        if key in m and int(m[key]) != dim:
            raise CheckpointError(f"{path}: {key} is {m[key]} but the text model's width is {dim}")
    tokens = text_meta.get("tokenizer.ggml.tokens") or []
    index = {t: i for i, t in enumerate(tokens) if t.startswith("<") and t.endswith(">")}
    for key, tok in _MARKERS.items():
        if tok not in index:
            raise CheckpointError(f"{path}: the text model's vocabulary has no {tok} token for its media")
        out[key] = index[tok]
    return out


def mmproj_tensor(name: str) -> tuple[str, Callable | None]:
    """mmproj tensor name → (our name, value transform or None)."""
    ours = _NAMES.get(name, name)  # unknown names: the loader reports them as unexpected
    if name in ("v.patch_embd.weight", "v.patch_norm.1.weight", "v.patch_norm.1.bias"):
        return ours, _unpermute
    if name == "v.position_embd.weight":
        return ours, lambda t: t.permute(1, 0, 2).contiguous()
    return ours, None


def mmproj_path_check(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such mmproj file")
    return p
