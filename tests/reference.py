"""Tiny random checkpoints written by transformers itself (the reference), and its outputs.

transformers is a test-only dependency: this module is the one place tests build the oracle.
The checkpoints come from unigemma's one writer on its transformers path
(`write_random_checkpoint(..., via="transformers")`): every parameter randomised (norm weights,
layer scalars and position tables too; their default init of ones/zeros would hide a missing
multiply), with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

S, F = "sliding_attention", "full_attention"
REAL_IDS = dict(image_token_id=258880, video_token_id=258884, audio_token_id=258881, boi_token_id=255999,
                eoi_token_id=258882, boa_token_id=256000, eoa_token_index=258883)
SMALL_IDS = dict(image_token_id=1000, video_token_id=1001, audio_token_id=1002, boi_token_id=1003,
                 eoi_token_id=1004, boa_token_id=1005, eoa_token_index=1006)


@dataclass(frozen=True)
class Shape:
    vocab: int = 1024
    hidden: int = 64
    intermediate: int = 128
    layers: tuple = (S, S, S, F)
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    global_head_dim: int = 32
    global_kv_heads: int = 1
    k_eq_v: bool = True
    window: int = 7
    vision: bool = True
    audio: bool = True
    mm_embed_dim: int = 48
    posemb: int = 16
    seed: int = 0
    text_only_class: bool = False  # Gemma4UnifiedForCausalLM (text-only key layout)

    @property
    def ids(self):
        return REAL_IDS if self.vocab > 260000 else SMALL_IDS

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def hf_config(shape: Shape) -> dict:
    """The transformers config (config.json's format) of `shape`."""
    text = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=len(shape.layers), num_attention_heads=shape.heads,
                num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, global_head_dim=shape.global_head_dim,
                num_global_key_value_heads=shape.global_kv_heads, attention_k_eq_v=shape.k_eq_v,
                sliding_window=shape.window, layer_types=list(shape.layers), final_logit_softcapping=30.0)
    if shape.text_only_class:  # Gemma4UnifiedForCausalLM
        return dict(model_type="gemma4_unified_text", **text)
    return dict(model_type="gemma4_unified", text_config=text,
                vision_config=dict(mm_embed_dim=shape.mm_embed_dim, mm_posemb_size=shape.posemb,
                                   output_proj_dims=shape.mm_embed_dim) if shape.vision else None,
                audio_config=dict() if shape.audio else None,
                **shape.ids)


def write_checkpoint(shape: Shape, root: Path) -> Path:
    """A random checkpoint of `shape` built and saved by transformers (unigemma's one writer)."""
    from unigemma.weights.random import write_random_checkpoint

    path = root / shape.key()
    if not (path / "config.json").exists():
        write_random_checkpoint(hf_config(shape), path, seed=shape.seed, via="transformers")
    return path


def load_reference(path: Path, dtype=torch.float32):
    from transformers import AutoConfig, Gemma4UnifiedForCausalLM, Gemma4UnifiedForConditionalGeneration

    cfg = AutoConfig.from_pretrained(path)
    cls = Gemma4UnifiedForCausalLM if cfg.model_type == "gemma4_unified_text" else Gemma4UnifiedForConditionalGeneration
    return cls.from_pretrained(path, dtype=dtype).eval()


def sliding_masks(ref, input_ids, attention_mask, mm_token_type_ids):
    """transformers' own mask dict for composition "sliding" (peers.md)."""
    B, L = input_ids.shape
    return ref.create_masks_for_generate(
        config=ref.config, inputs_embeds=torch.empty(B, L, 0, dtype=ref.dtype), attention_mask=attention_mask,
        past_key_values=None, position_ids=torch.arange(L)[None], mm_token_type_ids=mm_token_type_ids)


@dataclass
class Media:
    """Processor-shaped media tensors with a known number of real soft tokens each."""

    pixel_values: torch.Tensor | None = None
    image_position_ids: torch.Tensor | None = None
    image_tokens: list = field(default_factory=list)
    input_features: torch.Tensor | None = None
    input_features_mask: torch.Tensor | None = None
    audio_tokens: list = field(default_factory=list)
    pixel_values_videos: torch.Tensor | None = None
    video_position_ids: torch.Tensor | None = None
    frame_tokens: list = field(default_factory=list)

    def model_kwargs(self) -> dict:
        keys = ("pixel_values", "image_position_ids", "input_features", "input_features_mask",
                "pixel_values_videos", "video_position_ids")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def patches(grids: list[tuple[int, int]], max_patches: int, g: torch.Generator):
    """Random pixels [N, max_patches, 6912] with (x, y) positions of a rows×cols grid, (-1,-1) padding."""
    pv = torch.zeros(len(grids), max_patches, 6912)
    pos = torch.full((len(grids), max_patches, 2), -1, dtype=torch.long)
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        pv[i, :n] = torch.rand(n, 6912, generator=g)
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos[i, :n, 0], pos[i, :n, 1] = xs.flatten(), ys.flatten()
    return pv, pos


def audio_frames(lengths: list[int], g: torch.Generator):
    T = max(lengths)
    feats = torch.zeros(len(lengths), T, 640)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        feats[i, :n] = torch.randn(n, 640, generator=g) * 0.3
        mask[i, :n] = True
    return feats, mask
