"""Gemma 4 unified (`gemma4_unified`, `gemma4_unified_text`, GGUF arch `gemma4`): the family module.

The model is the text decoder (models/text.py) plus the encoder-free image and audio
embedders; models/base.py's `CausalLM` runs it (cached forward, head, `logits`). This file
adds what is Gemma 4's own: the module tree, which mirrors transformers'
(`model.language_model`, `model.embed_vision`, `model.embed_audio`) so loading is close to the
identity; `embed` (soft tokens scattered into their placeholders); the config parsing; every
rename between on-disk names and this tree, both ways; the GGUF mapping; what quantization
swaps. `FAMILY` lists them for the registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import FULL, SLIDING, AudioConfig, ModelConfig, TextConfig, VisionConfig, check, from_keys, stored_dtype
from ..embed.audio import embed_audio
from ..embed.merge import scatter_features
from ..embed.multimodal import MultimodalEmbedder
from ..embed.vision import VisionEmbedder, embed_patches
from ..errors import CheckpointError, ConfigError, InputError
from . import gguf_meta
from .base import CausalLM, Family
from .text import TextModel


class _Backbone(nn.Module):
    """The module tree (on-disk names): the decoder and the media embedders. text_model_args:
    another family's decoder layer / norm under the same tree (models/mini.py)."""

    def __init__(self, config: ModelConfig, **text_model_args):
        super().__init__()
        t = config.text
        self.language_model = TextModel(t, **text_model_args)
        self.embed_vision = VisionEmbedder(config.vision, t.hidden_size) if config.vision else None
        self.embed_audio = (MultimodalEmbedder(config.audio.audio_embed_dim, t.hidden_size, config.audio.rms_norm_eps)
                            if config.audio else None)


class Gemma4Unified(CausalLM):
    def __init__(self, config: ModelConfig, block_mask: str = "sliding"):
        super().__init__(config, block_mask)
        self.model = _Backbone(config)
        self.add_head()

    @property
    def text(self) -> TextModel:
        return self.model.language_model

    # -- inputs → embeddings -----------------------------------------------------------
    def embed(self, input_ids, pixel_values=None, image_position_ids=None, input_features=None,
              input_features_mask=None, pixel_values_videos=None, video_position_ids=None,
              require_media: bool = True) -> torch.Tensor:
        """Token ids [B, S] plus media → input embeddings [B, S, hidden] with soft tokens in place.

        require_media: a prompt's placeholders must come with their media. Generated tokens
        may be placeholder ids (the model can emit them); those embed as the pad row, as in
        the reference.
        """
        c = self.config
        kinds = [("image", c.image_token_id, pixel_values), ("video", c.video_token_id, pixel_values_videos),
                 ("audio", c.audio_token_id, input_features)]
        slots = {kind: input_ids == tok for kind, tok, _ in kinds}
        placeholder = slots["image"] | slots["video"] | slots["audio"]
        # placeholder rows are overwritten; look up the pad row only to stay in range
        h = self.text.embed(torch.where(placeholder, c.text.pad_token_id, input_ids))
        for kind, _, media in kinds:
            if media is None:
                if require_media and bool(slots[kind].any()):
                    raise InputError(f"the prompt has {int(slots[kind].sum())} {kind} placeholder tokens "
                                     f"but no {kind} inputs were given")
                continue
            h = scatter_features(h, slots[kind], self._media_features(kind, media, image_position_ids,
                                                                      video_position_ids, input_features_mask), kind)
        return h

    def logits(self, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
               image_position_ids=None, input_features=None, input_features_mask=None,
               pixel_values_videos=None, video_position_ids=None, *, block_mask: str | None = None) -> torch.Tensor:
        """`CausalLM.logits` with the processor's tensors named, in transformers' order (positional
        callers keep working)."""
        return super().logits(input_ids, attention_mask, mm_token_type_ids, block_mask=block_mask,
                              pixel_values=pixel_values, image_position_ids=image_position_ids,
                              input_features=input_features, input_features_mask=input_features_mask,
                              pixel_values_videos=pixel_values_videos, video_position_ids=video_position_ids)

    def _media_features(self, kind, media, image_position_ids, video_position_ids, input_features_mask):
        if kind == "audio":
            if self.model.embed_audio is None:
                raise InputError("audio inputs given, but this checkpoint has no audio embedder")
            if media.ndim != 3 or media.shape[-1] != self.config.audio.audio_embed_dim:
                raise InputError(f"input_features must be [num_audios, frames, {self.config.audio.audio_embed_dim}], "
                                 f"got {tuple(media.shape)}")
            mask = input_features_mask
            if mask is None:  # the reference crashes here; every frame is real by default
                mask = torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)
            if mask.shape != media.shape[:2]:
                raise InputError(f"input_features_mask {tuple(mask.shape)} does not match input_features "
                                 f"{tuple(media.shape[:2])}")
            return embed_audio(self.model.embed_audio, media.to(self.device), mask.to(self.device))
        if self.model.embed_vision is None:
            raise InputError(f"{kind} inputs given, but this checkpoint has no vision embedder")
        pos = image_position_ids if kind == "image" else video_position_ids
        name = "image_position_ids" if kind == "image" else "video_position_ids"
        if pos is None:
            raise InputError(f"{kind} pixel values given without {name}")
        if media.shape[-1] != self.config.vision.patch_dim or pos.shape[-1] != 2 or media.shape[:-1] != pos.shape[:-1]:
            raise InputError(f"{kind} pixel values {tuple(media.shape)} / {name} {tuple(pos.shape)}: expected "
                             f"[..., patches, {self.config.vision.patch_dim}] and [..., patches, 2]")
        return embed_patches(self.model.embed_vision, media.to(self.device), pos.to(self.device))



MEDIA_TOKEN_KEYS = ("image_token_id", "video_token_id", "audio_token_id", "boi_token_id", "eoi_token_id",
                    "boa_token_id", "eoa_token_index")


def parse_config(d: dict, model_type: str) -> ModelConfig:
    """config.json → ModelConfig: nested text/vision/audio configs, or (gemma4_unified_text,
    Gemma4UnifiedForCausalLM) the text config at the top level."""
    if model_type == "gemma4_unified_text":
        return ModelConfig(text=from_keys(TextConfig, d, "config"), model_type=model_type,
                           eos_token_id=d.get("eos_token_id"), dtype=stored_dtype(d))
    if not isinstance(d.get("text_config"), dict):
        raise ConfigError("config: model_type gemma4_unified needs a text_config object")
    text = from_keys(TextConfig, d["text_config"], "text_config")
    vision = from_keys(VisionConfig, d["vision_config"], "vision_config") if d.get("vision_config") else None
    audio = from_keys(AudioConfig, d["audio_config"], "audio_config") if d.get("audio_config") else None
    ids = {k: d[k] for k in MEDIA_TOKEN_KEYS if d.get(k) is not None}
    for k, v in ids.items():
        check(isinstance(v, int) and 0 <= v < text.vocab_size, "config",
              f"{k}={v!r} is outside the vocabulary of {text.vocab_size}")
    return ModelConfig(text=text, vision=vision, audio=audio, model_type=model_type,
                       eos_token_id=d.get("eos_token_id"), dtype=stored_dtype(d), **ids)


# -- checkpoint names, both ways --------------------------------------------------------------
_VISION_PROJ = "model.embed_vision.multimodal_embedder.embedding_projection.weight"


def checkpoint_name_to_module(name: str, config: ModelConfig) -> str | None:
    """On-disk tensor name → parameter name in this module tree (None: not stored by us)."""
    if name == "lm_head.weight" and config.text.tie_word_embeddings:
        return None  # tied to the embedding; some writers store the copy anyway
    if config.model_type == "gemma4_unified_text" and name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name == "model.embed_vision.embedding_projection.weight":
        return _VISION_PROJ
    if name.startswith("model.vision_embedder."):
        return "model.embed_vision." + name[len("model.vision_embedder."):]
    return name


def module_name_to_checkpoint(name: str, config: ModelConfig) -> str:
    """Parameter name → the released checkpoint's tensor name (the inverse of the above)."""
    if config.model_type == "gemma4_unified_text" and name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name == _VISION_PROJ:
        return "model.embed_vision.embedding_projection.weight"
    if name.startswith("model.embed_vision."):
        return "model.vision_embedder." + name[len("model.embed_vision."):]
    return name


def is_quantizable(name: str, module: nn.Module) -> bool:
    """The text decoder's projections and a separate LM head; not the media embedders."""
    return isinstance(module, nn.Linear) and ("language_model." in name or name == "lm_head")


# -- GGUF (llama.cpp arch "gemma4") -----------------------------------------------------------
def gguf_name(name: str) -> str | None:
    return gguf_meta.tensor_name(name, "model.language_model.")


def gguf_config(f, read) -> dict:
    """A GGUF file's metadata (f.metadata, f.tensors, f.path) → a config.json-style dict;
    read(name) → that tensor dequantized (only rope_freqs is read)."""
    meta, path = f.metadata, f.path
    c = gguf_meta.common(meta, "gemma4", path, f.tensors)
    n = c["num_hidden_layers"]
    swa = [bool(x) for x in np.atleast_1d(gguf_meta.get(meta, "gemma4.attention.sliding_window_pattern", path))]
    if len(swa) != n:
        raise CheckpointError(f"{path}: sliding_window_pattern has {len(swa)} entries for {n} layers")
    types = [SLIDING if s else FULL for s in swa]
    kv = gguf_meta.per_layer(gguf_meta.get(meta, "gemma4.attention.head_count_kv", path), n)
    hd = int(gguf_meta.get(meta, "gemma4.attention.key_length_swa", path))
    ghd = int(gguf_meta.get(meta, "gemma4.attention.key_length", path))
    if int(meta.get("gemma4.attention.shared_kv_layers", 0)) or int(meta.get("gemma4.embedding_length_per_layer_input", 0)):
        raise CheckpointError(f"{path}: KV sharing / per-layer inputs (Gemma 4 E2B/E4B) are not supported")
    if any(k.startswith("gemma4.expert_") for k in meta) or any(".ffn_gate_exps." in t for t in f.tensors):
        raise CheckpointError(f"{path}: Gemma 4 mixture-of-experts files are not supported")
    if int(meta.get("gemma4.rope.dimension_count_swa", hd)) != hd:
        raise CheckpointError(f"{path}: partial RoPE on sliding layers is not supported")
    rope_full = {"rope_type": "proportional", "rope_theta": float(gguf_meta.get(meta, "gemma4.rope.freq_base", path)),
                 "partial_rotary_factor": _rotary_factor(f, read, ghd)}
    k_eq_v = all(f"blk.{i}.attn_v.weight" not in f.tensors for i, t in enumerate(types) if t == FULL)
    full_kv = {kv[i] for i, t in enumerate(types) if t == FULL}
    text = dict(c, head_dim=hd, global_head_dim=ghd, attention_k_eq_v=k_eq_v, layer_types=types,
                num_key_value_heads=next(kv[i] for i, t in enumerate(types) if t == SLIDING) if SLIDING in types else kv[0],
                num_global_key_value_heads=full_kv.pop() if len(full_kv) == 1 else None,
                rope_parameters={SLIDING: {"rope_type": "default",
                                           "rope_theta": float(meta.get("gemma4.rope.freq_base_swa", 10_000.0))},
                                 FULL: rope_full})
    if not k_eq_v:  # per_layer_config carries the full layers' KV heads when V is separate
        text["per_layer_config"] = {str(i): {"head_dim": ghd, "num_key_value_heads": kv[i]}
                                    for i, t in enumerate(types) if t == FULL}
    return dict(model_type="gemma4_unified", text_config=text)


def _rotary_factor(f, read, global_head_dim: int) -> float:
    """llama.cpp encodes proportional RoPE as freq factors: 1 for rotated pairs, 1e30 (frequency
    ~0) for the rest (its gemma4 converter's `generate_extra_tensors`)."""
    t = f.tensors.get("rope_freqs.weight")
    if t is None:
        return 1.0
    v = read(t.name).numpy()
    rotated = int((v == 1.0).sum())
    if v.shape != (global_head_dim // 2,) or rotated + int((v >= 1e29).sum()) != v.size or (v[:rotated] != 1).any():
        raise CheckpointError(f"{Path(f.path)}: rope_freqs.weight is not a proportional-RoPE mask (1 … 1, 1e30 … 1e30)")
    return 2 * rotated / global_head_dim


def tiny_config(model_type: str = "gemma4_unified") -> dict:
    """A tiny config.json: K=V full layers, GQA, window 5, vision and audio (text only for
    gemma4_unified_text)."""
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=5, final_logit_softcapping=30.0,
                layer_types=[SLIDING, SLIDING, SLIDING, FULL])
    if model_type == "gemma4_unified_text":
        return {"model_type": model_type, **text}
    return {"model_type": model_type, "text_config": text,
            "vision_config": dict(mm_embed_dim=48, mm_posemb_size=16, output_proj_dims=48), "audio_config": {},
            **dict(zip(MEDIA_TOKEN_KEYS, range(500, 507)))}


FAMILY = Family(name="Gemma 4 unified", model_types=("gemma4_unified", "gemma4_unified_text"), model=Gemma4Unified,
                parse_config=parse_config, to_ours=checkpoint_name_to_module, to_disk=module_name_to_checkpoint,
                is_quantizable=is_quantizable, tiny_config=tiny_config, gguf_archs=("gemma4",),
                gguf_config=gguf_config, gguf_name=gguf_name, takes_media=True,
                chat_template="gemma4")
